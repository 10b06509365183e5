"""Continuous tasks (HarmonyOS startBackgroundRunning) end to end, with real
`bgqueue worker --continuous` and `bgqueue beat` processes on a real Redis.

Covers the refusals and their codes, dispatch only to continuous workers, mode updates,
stop, the DATA_TRANSFER stall cancel and its `continuousTaskCancel` event, the ways a
handler ends, and restarts on another worker after a SIGKILL or a warm shutdown.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import redis

import bgqueue as bg
from tests.apps import continuous_app
from tests.apps.continuous_app import APP_ID, EVENTS, GRACE, PING, STALL
from tests.harness import FAST, Cluster, wait_for

APP = "tests.apps.continuous_app:app"
HEARTBEAT_TIMEOUT = float(FAST["BGQUEUE_HEARTBEAT_TIMEOUT"])
Mode = bg.BackgroundMode
Reason = bg.ContinuousTaskCancelReason


# --- fixtures and helpers --------------------------------------------------------------


@pytest.fixture
def app(redis_url: str) -> Iterator[bg.BackgroundApp]:
    """The test app as a producer sees it, on the emptied test Redis."""
    for each in (continuous_app.app, continuous_app.system_app):
        each._client = None  # a previous test's connection points at the same server
        each.use_broker(redis_url)
    yield continuous_app.app
    continuous_app.app.off("continuousTaskCancel")


@pytest.fixture(autouse=True)
def _kill_processes_at_teardown(cluster: Cluster) -> Iterator[None]:
    """SIGKILL the test's processes once its assertions are done: a graceful Celery
    shutdown takes seconds per worker and is not what most of these tests check."""
    yield
    cluster.kill_all()


def worker(
    cluster: Cluster,
    name: str,
    continuous: bool = True,
    concurrency: int = 1,
    env: dict[str, str] | None = None,
) -> Any:
    return cluster.worker(
        name, concurrency=concurrency, continuous=continuous, app=APP, app_id=APP_ID, env=env
    )


def events(client: redis.Redis, event: str, ability: str) -> list[dict[str, Any]]:
    """What the handlers of one ability recorded, oldest first."""
    found = [json.loads(raw) for raw in client.lrange(EVENTS, 0, -1)]
    return [e for e in found if e["event"] == event and e["ability"] == ability]


def first(client: redis.Redis, event: str, ability: str, timeout: float = 20) -> dict[str, Any]:
    """Wait for the first `event` of `ability` and return it."""
    return wait_for(lambda: events(client, event, ability), timeout, f"{ability} {event}")[0]


def tasks(app: bg.BackgroundApp) -> dict[str, bg.ContinuousTaskInfo]:
    return {info.ability_name: info for info in app.all_continuous_tasks()}


def gone(app: bg.BackgroundApp, ability: str, timeout: float = 10) -> None:
    wait_for(lambda: ability not in tasks(app), timeout, f"{ability}'s record to be removed")


def begin_keys(app: bg.BackgroundApp) -> list[str]:
    """KEYS of lua/continuous_begin.lua."""
    return [app.keys.continuous, app.keys.continuous_leases]


def pid_gone(pid: int) -> bool:
    """Whether a process has exited (a zombie not yet reaped counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# --- refusals ----------------------------------------------------------------------------


def test_refusals_have_their_codes_and_change_nothing(app: bg.BackgroundApp) -> None:
    """Undeclared modes, a duplicate start, a stop or update of nothing: 9800005;
    WIFI_INTERACTION or VOIP from a non-system app: 202, checked before the declaration as
    on HarmonyOS; bad arguments: 401. A system app may start the system modes."""
    bad_arguments: list[tuple[Any, Any]] = [
        ("download", []),
        ("download", "warpDrive"),
        ("download", [99]),
        ("download", [True]),
        ("download", None),
        ("", [Mode.DATA_TRANSFER]),
        (42, [Mode.DATA_TRANSFER]),
    ]
    for ability, modes in bad_arguments:
        with pytest.raises(bg.ParameterError) as refused:
            app.start_background_running(ability, modes)
        assert refused.value.code == 401
    with pytest.raises(bg.ParameterError):
        app.start_background_running("download", [Mode.DATA_TRANSFER], payload=object())
    with pytest.raises(bg.ContinuousTaskVerificationFailed) as refused:
        app.start_background_running("download", [Mode.DATA_TRANSFER, Mode.BLUETOOTH_INTERACTION])
    assert refused.value.code == 9800005
    for mode in (Mode.WIFI_INTERACTION, Mode.VOIP):  # not declared either: 202 comes first
        with pytest.raises(bg.NotSystemApp) as not_system:
            app.start_background_running("download", [mode])
        assert not_system.value.code == 202
    for call in (app.stop_background_running, lambda a: app.update_background_running(a, [1])):
        with pytest.raises(bg.ContinuousTaskVerificationFailed):
            call("download")
    with pytest.raises(bg.ParameterError):
        app.on("continuousTaskStart", print)
    with pytest.raises(bg.ParameterError):
        app.on("continuousTaskCancel", "not callable")  # type: ignore[arg-type]
    assert app.all_continuous_tasks() == []

    info = app.start_background_running("download", [Mode.DATA_TRANSFER], payload={"n": 1})
    assert (info.ability_name, info.state, info.payload) == ("download", "pending", {"n": 1})
    assert info.background_modes == [Mode.DATA_TRANSFER] and info.restarts == 0
    with pytest.raises(bg.ContinuousTaskVerificationFailed) as refused:
        app.start_background_running("download", [Mode.AUDIO_PLAYBACK])
    assert refused.value.code == 9800005
    assert tasks(app)["download"] == info

    # The phone's single-mode call and its `bgModes` strings are accepted too.
    assert app.start_background_running("upload", "dataTransfer").background_modes == [
        Mode.DATA_TRANSFER
    ]
    both = app.update_background_running("upload", [Mode.AUDIO_PLAYBACK, "location"])
    assert both.background_modes == [Mode.AUDIO_PLAYBACK, Mode.LOCATION]
    with pytest.raises(bg.ContinuousTaskVerificationFailed):
        app.update_background_running("upload", [Mode.TASK_KEEPING])
    assert tasks(app)["upload"].background_modes == [Mode.AUDIO_PLAYBACK, Mode.LOCATION]

    # Not running yet: a stop removes the task at once, and a second stop finds nothing.
    app.stop_background_running("download")
    assert list(tasks(app)) == ["upload"]
    with pytest.raises(bg.ContinuousTaskVerificationFailed):
        app.stop_background_running("download")

    system = continuous_app.system_app
    wifi = system.start_background_running("hotspot", [Mode.WIFI_INTERACTION])
    call = system.start_background_running("call", [Mode.VOIP])
    assert [wifi.background_modes, call.background_modes] == [[Mode.WIFI_INTERACTION], [Mode.VOIP]]


def test_a_slow_cancel_callback_delays_no_other(app: bg.BackgroundApp) -> None:
    """Each `continuousTaskCancel` callback has a delivery thread of its own: one that takes
    a second per event holds up neither the subscription nor the other callbacks, and still
    gets every event, in order. (Delivered from the listening thread, the fast callback got
    each event only after the slow one had returned from the one before.)"""
    slow_seen: list[str] = []
    fast_seen: list[tuple[str, float]] = []

    def slow(info: bg.ContinuousTaskCancelInfo) -> None:
        time.sleep(1.0)
        slow_seen.append(info.ability_name)

    app.on("continuousTaskCancel", slow)
    app.on("continuousTaskCancel", lambda info: fast_seen.append((info.ability_name, time.time())))
    abilities = ["download", "upload", "player"]
    k = app.keys
    script_keys = [k.continuous, k.continuous_pending, k.continuous_leases]
    sent = []
    for ability in abilities:  # no worker: each waits pending, and a system cancel removes it
        app.start_background_running(ability, [Mode.DATA_TRANSFER])
        reason = int(Reason.SYSTEM_CANCEL)
        sent.append(time.time())
        app.call("continuous_stop", script_keys, [ability, "", reason, k.continuous_cancel, "x"])
    wait_for(lambda: len(fast_seen) == 3, 5, "the fast callback's three events")
    assert [name for name, _ in fast_seen] == abilities
    late = [at - when for (_, at), when in zip(fast_seen, sent, strict=True)]
    assert max(late) < 0.5, f"the fast callback got events {late} s after they were sent"
    wait_for(lambda: len(slow_seen) == 3, 10, "the slow callback's three events")
    assert slow_seen == abilities


# --- running -----------------------------------------------------------------------------


def test_runs_only_on_continuous_workers_until_stopped(
    cluster: Cluster, app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """A continuous task waits while only workers without --continuous are live, runs on a
    continuous worker, sees its modes updated and its stop, and is gone once it returns."""
    worker(cluster, "plain", continuous=False)
    cluster.beat()
    app.start_background_running("download", [Mode.AUDIO_PLAYBACK])
    app.scheduler.submit(bg.AppRefreshTaskRequest(PING))
    wait_for(lambda: app.scheduler.history(), 20, "the ping request to run")
    # Beat has dispatched (the ping) since the start, with only "plain" live.
    assert tasks(app)["download"].state == "pending"
    assert not events(redis_client, "start", "download")

    worker(cluster, "cont")
    started = first(redis_client, "start", "download")
    assert (started["worker"], started["modes"], started["restarts"]) == ("cont", [2], 0)
    info = tasks(app)["download"]
    assert (info.state, info.worker, info.pid) == ("running", "cont", started["pid"])
    # A duplicate or stale message of this dispatch is skipped: begin.lua refuses it.
    gen = json.loads(redis_client.hget(app.keys.continuous, "download"))["g"]
    for stale in (gen, gen - 1, gen + 1):
        begin_args = ["download", stale, "intruder", 1, 1000]
        assert app.call("continuous_begin", begin_keys(app), begin_args) is None

    app.update_background_running("download", [Mode.AUDIO_PLAYBACK, Mode.LOCATION])
    assert first(redis_client, "modes", "download", 5)["modes"] == [2, 4]

    asked = time.monotonic()
    app.stop_background_running("download")
    stopped = first(redis_client, "stopped", "download", 5)
    print(f"\nstop -> handler saw it after {time.monotonic() - asked:.2f}s")
    assert stopped["reason"] is None  # the app's own stop is not a cancel
    gone(app, "download")
    with pytest.raises(bg.ContinuousTaskVerificationFailed):
        app.stop_background_running("download")
    # Gone, so the ability may start again: a new task with a new id.
    again = app.start_background_running("download", [Mode.AUDIO_PLAYBACK])
    assert again.continuous_task_id != info.continuous_task_id
    wait_for(
        lambda: [
            e
            for e in events(redis_client, "start", "download")
            if e["id"] == again.continuous_task_id
        ],
        10,
        "the second task to start",
    )


def test_data_transfer_without_progress_is_cancelled_with_its_reason(
    cluster: Cluster, app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """DATA_TRANSFER with no progress for `data_transfer_stall` is cancelled, and
    `continuousTaskCancel` callbacks get SYSTEM_CANCEL_DATA_TRANSFER_LOW_SPEED; one that
    reports progress, or one in another mode, keeps running (no request budget applies)."""
    cancels: list[bg.ContinuousTaskCancelInfo] = []
    app.on("continuousTaskCancel", cancels.append)
    worker(cluster, "cont", concurrency=3)
    cluster.beat()
    stalled = app.start_background_running("download", [Mode.DATA_TRANSFER])
    app.start_background_running("upload", [Mode.DATA_TRANSFER], payload={"progress": 0.2})
    app.start_background_running("player", [Mode.AUDIO_PLAYBACK])

    began = first(redis_client, "start", "download")
    cancel = wait_for(lambda: cancels, STALL + 10, "the cancel event")[0]
    assert cancel.reason is Reason.SYSTEM_CANCEL_DATA_TRANSFER_LOW_SPEED
    assert (cancel.ability_name, cancel.id) == ("download", stalled.continuous_task_id)
    stopped = first(redis_client, "stopped", "download", 5)
    assert stopped["reason"] == Reason.SYSTEM_CANCEL_DATA_TRANSFER_LOW_SPEED
    assert stopped["t"] - began["t"] >= STALL - 0.1  # the window starts as the run does
    gone(app, "download")

    # The one reporting progress outlives the stall window twice over.
    wait_for(
        lambda: [e for e in events(redis_client, "progress", "upload") if e["elapsed"] > 2 * STALL],
        4 * STALL + 10,
        "upload to run past twice the stall window",
    )
    running = tasks(app)
    assert {name: info.state for name, info in running.items()} == {
        "upload": "running",
        "player": "running",
    }
    progress = running["upload"].progress
    assert progress is not None and progress[0] >= 2 and progress[1] == 1000
    assert [c.ability_name for c in cancels] == ["download"]


def test_handler_endings(
    cluster: Cluster, app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """Returning ends the task quietly; raising cancels it with SYSTEM_CANCEL; one no live
    worker has the handler for waits, uncancelled; a handler ignoring a stop is terminated
    after the grace."""
    cancels: list[bg.ContinuousTaskCancelInfo] = []
    app.on("continuousTaskCancel", cancels.append)
    worker(cluster, "cont", concurrency=4)
    cluster.beat()
    audio = [Mode.AUDIO_PLAYBACK]
    app.start_background_running("finite", audio, payload={"seconds": 0.3})
    app.start_background_running("crash", audio, payload={"raise": "boom"})
    app.start_background_running("unknown", audio)
    app.start_background_running("stubborn", audio, payload={"ignore_stop": True})

    first(redis_client, "return", "finite")
    for ability in ("finite", "crash"):
        gone(app, ability)
    wait_for(lambda: len(cancels) == 1, 10, "the cancel event")
    [crashed] = cancels
    assert (crashed.ability_name, crashed.reason) == ("crash", Reason.SYSTEM_CANCEL)
    assert "boom" in crashed.message
    assert tasks(app)["unknown"].state == "pending"

    stubborn = first(redis_client, "start", "stubborn")
    asked = time.monotonic()
    app.stop_background_running("stubborn")
    # Still stopping: one task per ability, and a stop is not repeated.
    with pytest.raises(bg.ContinuousTaskVerificationFailed):
        app.start_background_running("stubborn", audio)
    with pytest.raises(bg.ContinuousTaskVerificationFailed):
        app.stop_background_running("stubborn")
    gone(app, "stubborn", GRACE + 5)
    waited = time.monotonic() - asked
    print(f"\nstubborn handler terminated {waited:.2f}s after the stop")
    assert waited >= GRACE
    wait_for(lambda: pid_gone(stubborn["pid"]), 5, "the stubborn pool process to be killed")
    assert len(cancels) == 1  # the app's own stop is not announced
    assert tasks(app)["unknown"].state == "pending"


def test_rolling_deploy_runs_a_continuous_task_only_where_its_handler_is(
    cluster: Cluster, app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """An old continuous worker without the 'download' handler never gets that task: it
    stays pending, uncancelled; a new build joins and runs it. (Before, the old worker took
    it and cancelled it with SYSTEM_CANCEL.)"""
    cancels: list[bg.ContinuousTaskCancelInfo] = []
    app.on("continuousTaskCancel", cancels.append)
    worker(cluster, "old", env={"TEST_OMIT": "download"})
    cluster.beat()
    app.start_background_running("download", [Mode.DATA_TRANSFER], payload={"progress": 0.2})
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert tasks(app)["download"].state == "pending" and not cancels
        time.sleep(0.05)
    worker(cluster, "new")
    began = first(redis_client, "start", "download")
    assert began["worker"] == "new"
    assert tasks(app)["download"].state == "running" and not cancels


# --- worker loss -------------------------------------------------------------------------


def test_worker_kill_restarts_the_task_on_another_worker(
    cluster: Cluster, app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """A continuous task whose worker is SIGKILLed starts again on another continuous
    worker within the heartbeat timeout and a few seconds, once, with restarts = 1."""
    procs = {"cA": worker(cluster, "cA"), "cB": worker(cluster, "cB")}
    cluster.beat()
    info = app.start_background_running("download", [Mode.AUDIO_PLAYBACK])
    before = first(redis_client, "start", "download")
    survivor = "cB" if before["worker"] == "cA" else "cA"

    procs[before["worker"]].kill()
    killed_at = time.monotonic()
    after = wait_for(
        lambda: [e for e in events(redis_client, "start", "download") if e["restarts"] == 1],
        HEARTBEAT_TIMEOUT + 8,
        "the restart on the other worker",
    )[0]
    print(f"\nworker kill -> continuous task restarted after {time.monotonic() - killed_at:.2f}s")
    assert (after["worker"], after["id"]) == (survivor, info.continuous_task_id)
    now = tasks(app)["download"]
    assert (now.state, now.worker, now.restarts) == ("running", survivor, 1)
    assert len(events(redis_client, "start", "download")) == 2


def test_warm_shutdown_hands_the_task_to_another_worker(
    cluster: Cluster, app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """SIGTERM to a worker's main process: its continuous handler sees `stopped`, returns,
    and the task starts again on another continuous worker; the worker then exits."""
    procs = {"cA": worker(cluster, "cA"), "cB": worker(cluster, "cB")}
    cluster.beat()
    app.start_background_running("download", [Mode.AUDIO_PLAYBACK])
    before = first(redis_client, "start", "download")
    leaving = procs[before["worker"]]

    leaving.signal(signal.SIGTERM)
    stopped = first(redis_client, "stopped", "download", 10)
    assert (stopped["worker"], stopped["reason"]) == (before["worker"], None)
    after = wait_for(
        lambda: [e for e in events(redis_client, "start", "download") if e["restarts"] == 1],
        15,
        "the handover to the other worker",
    )[0]
    assert after["worker"] != before["worker"]
    wait_for(lambda: not leaving.alive(), 15, "the leaving worker to exit")
    assert tasks(app)["download"].worker == after["worker"]
