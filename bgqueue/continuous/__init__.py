"""Continuous tasks (HarmonyOS `startBackgroundRunning`): long-running handlers with
declared background modes, run without a time budget on workers started with `--continuous`.

A continuous task is one Redis record per (app, ability) in `AppKeys.continuous`, in a
state machine like a request's:

    start ─► pending ─(beat: a continuous worker is live)─► dispatched ─► running
                ▲                                                          │
                └──── its worker died (run lease lapsed), or handed over ◄─┤
    stop, system cancel:  pending, dispatched ─► removed
                          running ─► stopping ─(the handler returns)─► removed

Beat publishes one message per dispatch with a new generation; a worker runs it only if
the generation is still the record's (`lua/continuous_begin.lua`), so duplicate and stale
messages never run twice. A watchdog thread beside the handler renews the run's lease,
hands it mode updates and stops (`task.stopped`), cancels a DATA_TRANSFER task that stops
reporting progress, and terminates a handler that ignores a stop for longer than a grace.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from bgqueue.broker import CONNECT_TIMEOUT, connect, messages
from bgqueue.errors import ContinuousTaskVerificationFailed, NotSystemApp, ParameterError
from bgqueue.model.modes import SYSTEM_ONLY_MODES, BackgroundMode
from bgqueue.model.requests import check_name, encode_payload, from_ms

if TYPE_CHECKING:
    from bgqueue.model.context import AppContext, BeatContext
    from bgqueue.model.keys import AppKeys

log = logging.getLogger("bgqueue.continuous")

CELERY_TASK = "bgqueue.continuous"  # one Celery task runs every ability; kwargs name it
CANCEL_EVENT = "continuousTaskCancel"
NEVER = float("inf")

# HarmonyOS's `bgModes` strings (startBackgroundRunning since API 12), accepted as modes too.
MODE_NAMES = {
    "dataTransfer": BackgroundMode.DATA_TRANSFER,
    "audioPlayback": BackgroundMode.AUDIO_PLAYBACK,
    "audioRecording": BackgroundMode.AUDIO_RECORDING,
    "location": BackgroundMode.LOCATION,
    "bluetoothInteraction": BackgroundMode.BLUETOOTH_INTERACTION,
    "multiDeviceConnection": BackgroundMode.MULTI_DEVICE_CONNECTION,
    "wifiInteraction": BackgroundMode.WIFI_INTERACTION,
    "voip": BackgroundMode.VOIP,
    "taskKeeping": BackgroundMode.TASK_KEEPING,
}


class ContinuousTaskCancelReason(IntEnum):
    """Why a continuous task was cancelled (HarmonyOS values). bgqueue itself sends
    SYSTEM_CANCEL (the handler raised, or no worker has a handler for the ability) and
    SYSTEM_CANCEL_DATA_TRANSFER_LOW_SPEED (no progress for `Limits.data_transfer_stall`)."""

    USER_CANCEL = 1
    SYSTEM_CANCEL = 2
    USER_CANCEL_REMOVE_NOTIFICATION = 3
    SYSTEM_CANCEL_DATA_TRANSFER_LOW_SPEED = 4
    SYSTEM_CANCEL_AUDIO_PLAYBACK_NOT_USE_AVSESSION = 5
    SYSTEM_CANCEL_AUDIO_PLAYBACK_NOT_RUNNING = 6
    SYSTEM_CANCEL_AUDIO_RECORDING_NOT_RUNNING = 7
    SYSTEM_CANCEL_NOT_USE_LOCATION = 8
    SYSTEM_CANCEL_NOT_USE_BLUETOOTH = 9
    SYSTEM_CANCEL_NOT_USE_MULTI_DEVICE = 10
    SYSTEM_CANCEL_USE_ILLEGALLY = 11


@dataclass(frozen=True)
class ContinuousTaskInfo:
    """A continuous task as `all_continuous_tasks` reports it (HarmonyOS ContinuousTaskInfo,
    without the phone's uid, notification and WantAgent fields)."""

    ability_name: str
    background_modes: list[BackgroundMode]
    continuous_task_id: int
    state: str  # pending | dispatched | running | stopping
    restarts: int  # runs lost to dead workers or handed over at a worker's shutdown
    payload: Any
    created_at: datetime
    worker: str | None = None
    pid: int | None = None  # of the pool process running it
    started_at: datetime | None = None  # of the current run
    progress: tuple[int, int] | None = None  # (completed, total), last reported by the handler

    @classmethod
    def from_record(cls, raw: bytes | str) -> ContinuousTaskInfo:
        """The info of one record in `AppKeys.continuous` (layout: lua/continuous_start.lua)."""
        record = json.loads(raw)
        progress = json.loads(record["pg"]) if "pg" in record else None
        return cls(
            ability_name=record["ab"],
            background_modes=[BackgroundMode(m) for m in record["m"]],
            continuous_task_id=int(record["id"]),
            state=record["s"],
            restarts=int(record["r"]),
            payload=json.loads(record["pl"]),
            created_at=_moment(record["ca"]),
            worker=record.get("w"),
            pid=int(record["pid"]) if "pid" in record else None,
            started_at=from_ms(record.get("sa")),
            progress=(int(progress[0]), int(progress[1])) if progress else None,
        )


@dataclass(frozen=True)
class ContinuousTaskCancelInfo:
    """What `app.on("continuousTaskCancel", callback)` callbacks receive."""

    reason: ContinuousTaskCancelReason
    id: int  # the task's continuous_task_id
    ability_name: str
    message: str = ""

    @classmethod
    def from_event(cls, data: bytes | str) -> ContinuousTaskCancelInfo:
        """Parse one message of the app's cancel channel (lua/continuous_stop.lua)."""
        event = json.loads(data)
        reason = ContinuousTaskCancelReason(int(event["reason"]))
        return cls(reason, int(event["id"]), str(event["ab"]), str(event.get("msg", "")))


def _moment(ms: int | float) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


class ContinuousTask:
    """A running continuous task, as its handler sees it. The handler runs until it
    returns; it should return soon after `stopped` is set (by `stop_background_running`,
    a system cancel, or its worker shutting down), or it is terminated after a grace of
    `Limits.expiration_warning` seconds."""

    def __init__(
        self,
        ability: str,
        modes: Iterable[BackgroundMode],
        payload: Any,
        continuous_task_id: int,
        restarts: int,
    ) -> None:
        self.ability = ability
        self.payload = payload
        self.continuous_task_id = continuous_task_id
        self.restarts = restarts  # 0 on the first run; more after a worker died or left
        self.stopped = threading.Event()
        # Set before `stopped` when the system cancelled the task; None when the app stopped
        # it or it is being handed to another worker.
        self.cancel_reason: ContinuousTaskCancelReason | None = None
        self._modes = list(modes)
        self._lock = threading.Lock()
        self._progress: tuple[int, int] | None = None
        # When progress was last reported (or the run or its DATA_TRANSFER mode began).
        self.last_progress = time.monotonic()

    @property
    def modes(self) -> list[BackgroundMode]:
        """The task's modes now; `update_background_running` changes them while it runs."""
        return list(self._modes)

    @property
    def progress(self) -> tuple[int, int] | None:
        """The last (completed, total) reported."""
        return self._progress

    def report_progress(self, completed: int, total: int = 0) -> None:
        """Report how far the work has come. Only a change counts as progress: a
        DATA_TRANSFER task whose reports stay the same for `Limits.data_transfer_stall`
        seconds is cancelled with SYSTEM_CANCEL_DATA_TRANSFER_LOW_SPEED."""
        for value, what in ((completed, "completed"), (total, "total")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ParameterError(f"{what} must be a non-negative integer, got {value!r}")
        with self._lock:
            if self._progress != (completed, total):
                self._progress = (completed, total)
                self.last_progress = time.monotonic()

    def _update_modes(self, modes: list[BackgroundMode]) -> None:
        """Called by the watchdog; a newly added DATA_TRANSFER starts its stall window now."""
        with self._lock:
            if BackgroundMode.DATA_TRANSFER in modes and BackgroundMode.DATA_TRANSFER not in (
                self._modes
            ):
                self.last_progress = time.monotonic()
            self._modes = list(modes)


# --- the producer's side ---------------------------------------------------------------


def _mode(value: object) -> BackgroundMode:
    if isinstance(value, str):
        named = MODE_NAMES.get(value) or BackgroundMode.__members__.get(value)
        if named is None:
            raise ParameterError(f"unknown background mode {value!r}")
        return named
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParameterError(f"a background mode must be a BackgroundMode, got {value!r}")
    try:
        return BackgroundMode(value)
    except ValueError:
        raise ParameterError(f"unknown background mode {value!r}") from None


def check_modes(app: AppContext, modes: object) -> list[BackgroundMode]:
    """The requested modes, checked in HarmonyOS's order: each mode must exist (401), a
    system mode needs a system app (NotSystemApp, 202), and it must be declared in the
    app's `background_modes` (ContinuousTaskVerificationFailed, 9800005)."""
    if isinstance(modes, BackgroundMode | str):
        items: list[object] = [modes]  # the phone's single-mode startBackgroundRunning
    elif isinstance(modes, Iterable) and not isinstance(modes, bytes):
        items = list(modes)
    else:
        raise ParameterError(f"modes must be a list of BackgroundMode, got {modes!r}")
    if not items:
        raise ParameterError("modes must name at least one BackgroundMode")
    parsed = list(dict.fromkeys(_mode(item) for item in items))
    for mode in parsed:
        if mode in SYSTEM_ONLY_MODES and not app.system:
            raise NotSystemApp(f"{mode.name} is for system apps: create the app with system=True")
        if mode not in app.background_modes:
            raise ContinuousTaskVerificationFailed(
                f"{mode.name} is not declared: add it to BackgroundApp(background_modes=[...])"
            )
    return parsed


def _check_ability(ability: object) -> str:
    return check_name(ability, "ability")


def start(app: AppContext, ability: str, modes: object, payload: Any = None) -> ContinuousTaskInfo:
    """`start_background_running`: record the task; beat dispatches it to a continuous worker."""
    _check_ability(ability)
    checked = check_modes(app, modes)
    text = encode_payload(payload)
    keys = app.keys
    script_keys = [keys.continuous, keys.continuous_pending, keys.seq]
    args = [ability, json.dumps([int(m) for m in checked]), text]
    raw = app.call("continuous_start", script_keys, args, wake=True)
    if raw is None:
        raise ContinuousTaskVerificationFailed(
            f"{ability!r} already has a continuous task (one per ability): stop it first, "
            "or change its modes with update_background_running"
        )
    app.announce()
    return ContinuousTaskInfo.from_record(raw)


def update(app: AppContext, ability: str, modes: object) -> ContinuousTaskInfo:
    """`update_background_running`: new modes; a running handler sees them within a
    heartbeat interval."""
    _check_ability(ability)
    checked = check_modes(app, modes)
    args = [ability, json.dumps([int(m) for m in checked])]
    raw = app.call("continuous_update", [app.keys.continuous], args)
    if raw is None:
        raise ContinuousTaskVerificationFailed(
            f"{ability!r} has no continuous task to update: start it first"
        )
    return ContinuousTaskInfo.from_record(raw)


def stop(app: AppContext, ability: str) -> None:
    """`stop_background_running`: a task not running yet is removed now; a running one is
    marked stopping, its handler sees `task.stopped` within a heartbeat interval, and the
    task is removed when the handler returns."""
    _check_ability(ability)
    keys = app.keys
    script_keys = [keys.continuous, keys.continuous_pending, keys.continuous_leases]
    if not app.call("continuous_stop", script_keys, [ability, "", 0, keys.continuous_cancel, ""]):
        raise ContinuousTaskVerificationFailed(
            f"{ability!r} has no continuous task to stop (never started, ended, or already "
            "being stopped)"
        )


def all_tasks(app: AppContext) -> list[ContinuousTaskInfo]:
    """Every continuous task of the app, in the order they were started."""
    with app.service():
        raws = app.client.hvals(app.keys.continuous)
    infos = [ContinuousTaskInfo.from_record(raw) for raw in raws]
    return sorted(infos, key=lambda info: info.continuous_task_id)


CancelCallback = Callable[[ContinuousTaskCancelInfo], Any]


def check_subscription(event: object, callback: object) -> None:
    """ParameterError unless `event` is "continuousTaskCancel" and `callback` is callable
    (or None, which `off` takes as every callback)."""
    if event != CANCEL_EVENT:
        raise ParameterError(f"unknown event {event!r}: the only event is {CANCEL_EVENT!r}")
    if callback is not None and not callable(callback):
        raise ParameterError("callback must be callable")


class CancelListener:
    """The producer's side of `app.on("continuousTaskCancel", ...)`: a daemon thread
    subscribed to the app's cancel channel hands each ContinuousTaskCancelInfo to every
    callback's own delivery thread (`_Mailbox`), so a slow callback delays neither the
    subscription nor the other callbacks. As on HarmonyOS, a cancel announced while nobody
    listens is not kept for later."""

    def __init__(self, app: AppContext) -> None:
        self.app = app
        self.mailboxes: dict[CancelCallback, _Mailbox] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def add(self, callback: CancelCallback) -> None:
        """Register a callback; the first one starts the listening thread."""
        with self._lock:
            if self._thread is None:
                self._start()
            if callback not in self.mailboxes:
                self.mailboxes[callback] = _Mailbox(callback)

    def remove(self, callback: CancelCallback | None = None) -> None:
        """Unregister one callback, or all; the thread ends with the last one."""
        with self._lock:
            gone = list(self.mailboxes) if callback is None else [callback]
            for each in gone:
                mailbox = self.mailboxes.pop(each, None)
                if mailbox is not None:
                    mailbox.close()
            if not self.mailboxes and self._thread is not None:
                self._stopping.set()
                self._thread = None

    def _start(self) -> None:
        pubsub = self._subscribe()
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._loop,
            args=(pubsub, self._stopping),
            name=f"bgqueue-{CANCEL_EVENT}",
            daemon=True,
        )
        self._thread.start()

    def _subscribe(self) -> Any:
        """A subscription on a connection of its own (the app's client may be replaced),
        returned once the server confirms it: a cancel announced after `on` returns is heard."""
        client: Any = connect(self.app.broker_url)
        pubsub = client.pubsub()
        with self.app.service():
            pubsub.subscribe(self.app.keys.continuous_cancel)
            deadline = time.monotonic() + CONNECT_TIMEOUT
            while time.monotonic() < deadline:
                message = pubsub.get_message(timeout=0.1)
                if message is not None and message["type"] == "subscribe":
                    break
        return pubsub

    def _loop(self, pubsub: Any, stopping: threading.Event) -> None:
        while not stopping.is_set():
            try:
                if pubsub is None:
                    pubsub = self._subscribe()
                message = pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except Exception as exc:  # connection lost: subscribe again on a new one
                log.warning("cancel listener of %s: %s", self.app.app_id, type(exc).__name__)
                _close(pubsub)
                pubsub = None
                stopping.wait(1.0)
                continue
            # A listener stopped meanwhile delivers nothing: a newer one may be listening.
            if message is not None and message["type"] == "message" and not stopping.is_set():
                self._deliver(message["data"])
        _close(pubsub)

    def _deliver(self, data: bytes) -> None:
        try:
            info = ContinuousTaskCancelInfo.from_event(data)
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed cancel event: %r", data[:200])
            return
        with self._lock:
            mailboxes = list(self.mailboxes.values())
        for mailbox in mailboxes:
            mailbox.put(info)


class _Mailbox:
    """One callback's queue of cancel events and the daemon thread that calls it with
    them, in order. Bounded: a callback that stops returning loses the newest events (with
    a warning) instead of growing the producer's memory without end."""

    LIMIT = 1000

    def __init__(self, callback: CancelCallback) -> None:
        self.callback = callback
        self.events: queue.Queue[ContinuousTaskCancelInfo | None] = queue.Queue(self.LIMIT)
        threading.Thread(target=self._loop, name="bgqueue-cancel-callback", daemon=True).start()

    def put(self, info: ContinuousTaskCancelInfo) -> None:
        try:
            self.events.put_nowait(info)
        except queue.Full:
            log.warning("a %s callback is %d events behind; dropped one", CANCEL_EVENT, self.LIMIT)

    def close(self) -> None:
        """End the delivery thread once it has delivered what it holds."""
        with contextlib.suppress(queue.Full):
            self.events.put_nowait(None)

    def _loop(self) -> None:
        while (info := self.events.get()) is not None:
            try:
                self.callback(info)
            except Exception:
                log.exception("a %s callback raised", CANCEL_EVENT)


def _close(pubsub: Any) -> None:
    """Close a subscription and its connection, ignoring a connection already broken."""
    if pubsub is not None:
        with contextlib.suppress(Exception):
            pubsub.close()
            pubsub.connection_pool.disconnect()


# --- beat (bgqueue.beat.EXTENSIONS) --------------------------------------------------------


def dispatch(beat: BeatContext, app: AppKeys) -> float:
    """Send each waiting continuous task to the least busy live continuous worker that has
    its handler (to that worker's own queue); a task nobody can run stays pending and costs
    one read. Returns when beat next needs to call."""
    batch = beat.settings.claim_batch
    waiting = [a.decode() for a in beat.client.zrange(app.continuous_pending, 0, batch - 1)]
    if not waiting:
        return NEVER
    live = beat.live_workers(app)
    load = {name: hb.get("busy", 0) / max(1, hb.get("concurrency", 1)) for name, hb in live.items()}
    picks: list[str] = []
    for ability in waiting:
        able = [
            name
            for name, heartbeat in live.items()
            if heartbeat.get("continuous") and ability in beat.class_of(app, heartbeat)["c"]
        ]
        if able:
            worker = min(able, key=lambda name: (load[name], name))
            load[worker] += 1 / max(1, live[worker].get("concurrency", 1))
            picks += [ability, worker]
    if not picks:
        return NEVER
    # Claimed straight to the dispatch lease: continuous tasks are few, and a lease extended
    # after publishing could overwrite the run lease of a worker that started at once.
    lease_ms = int(beat.settings.dispatch_lease * 1000)
    script_keys = [app.continuous, app.continuous_pending, app.continuous_leases, app.seq]
    raw = beat.scripts.continuous_claim(keys=script_keys, args=[lease_ms, *picks])
    claimed = [
        (raw[i].decode(), int(raw[i + 1]), raw[i + 2].decode()) for i in range(0, len(raw), 3)
    ]
    _publish(beat, app, claimed)
    return 0.0 if len(waiting) == batch else NEVER


def _publish(beat: BeatContext, app: AppKeys, claimed: list[tuple[str, int, str]]) -> None:
    if claimed:
        messages.push(
            beat.client,
            [
                messages.task_message(
                    app.worker_queue(worker), CELERY_TASK, {"ability": ability, "gen": gen}
                )
                for ability, gen, worker in claimed
            ],
        )


def sweep(beat: BeatContext, app: AppKeys, live: dict[str, dict[str, Any]]) -> None:
    """Restart continuous tasks whose run lease lapsed (their worker died), put back to
    pending dispatches whose worker is gone, and publish again those never started
    (lua/continuous_lapsed.lua)."""
    lapsed = beat.client.zrangebyscore(
        app.continuous_leases, "-inf", beat.server_ms(), start=0, num=beat.settings.claim_batch
    )
    if not lapsed:
        return
    lease_ms = int(beat.settings.dispatch_lease * 1000)
    script_keys = [app.continuous, app.continuous_pending, app.continuous_leases]
    live_names = " ".join(sorted(live))
    raw = beat.scripts.continuous_lapsed(keys=script_keys, args=[lease_ms, live_names, *lapsed])
    again: list[tuple[str, int, str]] = []
    for i in range(0, len(raw), 4):
        ability, gen, what = raw[i].decode(), int(raw[i + 1]), raw[i + 2].decode()
        if what == "publish":
            again.append((ability, gen, raw[i + 3].decode()))
        elif what == "restart":
            log.warning("continuous task %s of %s lost its worker: restarting", ability, app.app_id)
        elif what == "requeue":
            log.warning(
                "continuous task %s of %s: its worker left; waiting again", ability, app.app_id
            )
        else:
            log.info("continuous task %s of %s died while stopping: removed", ability, app.app_id)
    # A message still queued is only waiting for its worker: publish again only once the
    # worker's queue is empty, when it was lost or a worker about to start it skips it.
    queued = beat.queued(app, sorted({app.worker_queue(w) for _, _, w in again}))
    _publish(beat, app, [item for item in again if app.worker_queue(item[2]) not in queued])
