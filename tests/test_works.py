"""The work scheduler (HarmonyOS workScheduler) with real Redis, `bgqueue worker` and
`bgqueue beat` processes: typed refusals, WorkInfo round trips, condition matching and
routing (every condition key, idle wait), repeat cycles and counts, the run limit and
is_last_work_time_out, stop_work / stop_and_clear_works, efficiency grants (TIMER,
WORK_SCHEDULER), a worker lost mid-run, and a persisted repeating work surviving a
restart of every process and of Redis. Every wait polls a condition with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import bgqueue as bg
from bgqueue.broker.embedded import RedisServer
from bgqueue.works import matches_work
from tests.apps.works_app import APP_ID, EVENTS, LIMITS, producer
from tests.harness import Cluster, wait_for

WORKS_APP = "tests.apps.works_app:app"
RUN_LIMIT = LIMITS.work_run_limit  # 2 s
CYCLE_MS = int(LIMITS.min_repeat_interval * 1000)  # 1000 ms, the shortest allowed
SLACK = 0.1  # seconds: clock reads, ms rounding, one heartbeat of the watchdog


# --- helpers ------------------------------------------------------------------------


@pytest.fixture
def fast(cluster: Cluster) -> Iterator[Cluster]:
    """The cluster, SIGKILLed all at once at teardown (a graceful Celery stop is slow)."""
    yield cluster
    _kill_all(cluster)


def _kill_all(group: Cluster) -> None:
    for proc in group.procs:
        if proc.alive():
            os.killpg(proc.pid, signal.SIGKILL)
    for proc in group.procs:
        proc.popen.wait(10)


@pytest.fixture
def app(redis_url: str) -> bg.BackgroundApp:
    """The works app as a producer sees it, on the emptied test Redis."""
    return producer(redis_url)


def worker(
    group: Cluster,
    name: str,
    *conditions: str,
    concurrency: int = 1,
    env: dict[str, str] | None = None,
) -> Any:
    """A `bgqueue worker` of the works app with these `--condition`s, once its heartbeat is live."""
    return group.worker(
        name, list(conditions), concurrency=concurrency, app=WORKS_APP, app_id=APP_ID, env=env
    )


def events(
    client: redis.Redis, event: str | None = None, work_id: int | None = None
) -> list[dict[str, Any]]:
    """Calls recorded by the works app's extension, oldest first, optionally filtered."""
    found = [json.loads(raw) for raw in client.lrange(EVENTS, 0, -1)]
    return [
        e
        for e in found
        if (event is None or e["event"] == event) and (work_id is None or e["id"] == work_id)
    ]


def one_shot(work_id: int, **fields: Any) -> bg.WorkInfo:
    """A work run once, on any worker with a battery level of at least 0 (every worker)."""
    fields.setdefault("battery_level", 0)
    return bg.WorkInfo(work_id, "record", **fields)


def repeating(work_id: int, **fields: Any) -> bg.WorkInfo:
    fields.setdefault("repeat_cycle_time", CYCLE_MS)
    return bg.WorkInfo(work_id, "record", is_repeat=True, **fields)


def work_ids(app: bg.BackgroundApp) -> list[int]:
    return [w.work_id for w in app.obtain_all_works()]


def refused(error: type[bg.BackgroundTaskError], code: int, call: Callable[[], object]) -> str:
    """Run `call`, expecting `error` with `code`; returns its message."""
    with pytest.raises(error) as caught:
        call()
    assert caught.value.code == code
    return caught.value.message


# --- refusals and round trips (no processes) ---------------------------------------------


BAD_WORK_INFOS: list[dict[str, Any]] = [
    {"work_id": -1},
    {"work_id": True},
    {"work_id": "1"},
    {"work_id": 2**31},
    {"ability_name": ""},
    {"ability_name": 7},
    {"battery_level": None},  # no condition at all
    {"network_type": 9},
    {"network_type": "wifi"},
    {"battery_level": 101},
    {"battery_level": True},
    {"battery_status": 3},
    {"storage_request": bg.NetworkType.WIFI.name},
    {"charger_type": bg.ChargingType.AC},  # without is_charging
    {"is_charging": 1},
    {"is_deep_idle": True, "idle_wait_time": -5},
    {"idle_wait_time": 1000},  # without is_deep_idle
    {"is_repeat": True},  # without repeat_cycle_time
    {"repeat_cycle_time": 5000},  # without is_repeat or repeat_count
    {"repeat_count": 0, "repeat_cycle_time": 5000},
    {"is_persisted": "yes"},
    {"parameters": {"a": [1]}},
    {"parameters": {"a": float("nan")}},
    {"parameters": {1: "x"}},
    {"parameters": "x=1"},
]


@pytest.mark.parametrize("fields", BAD_WORK_INFOS)
def test_bad_work_info_is_a_parameter_error(fields: dict[str, Any]) -> None:
    """Every bad type, range or combination is ParameterError (401) when the WorkInfo is made."""
    kwargs: dict[str, Any] = {"work_id": 1, "ability_name": "record", "battery_level": 10}
    kwargs.update(fields)
    refused(bg.ParameterError, 401, lambda: bg.WorkInfo(**kwargs))


def test_refusals_are_typed_and_change_nothing(app: bg.BackgroundApp) -> None:
    """9700005 for an interval under the minimum, a duplicate id and an 11th work; 9700004
    for unknown ids and another app's bundle; 401 for bad arguments and a WorkInfo changed
    after it was made. Nothing refused is stored."""
    too_often = repeating(1, repeat_cycle_time=CYCLE_MS - 1)
    assert "minimum" in refused(bg.StartWorkFailed, 9700005, lambda: app.start_work(too_often))
    app.start_work(one_shot(1))
    message = refused(bg.StartWorkFailed, 9700005, lambda: app.start_work(one_shot(1)))
    assert "already exists" in message
    for work_id in range(2, 11):
        app.start_work(one_shot(work_id))
    assert "10 works" in refused(bg.StartWorkFailed, 9700005, lambda: app.start_work(one_shot(11)))

    other = one_shot(12, bundle_name="com.example.other")
    refused(bg.WorkInfoCheckFailed, 9700004, lambda: app.start_work(other))
    refused(bg.WorkInfoCheckFailed, 9700004, lambda: app.get_work_status(99))
    refused(bg.WorkInfoCheckFailed, 9700004, lambda: app.stop_work(99))
    refused(bg.WorkInfoCheckFailed, 9700004, lambda: app.stop_work(one_shot(99), True))
    refused(bg.WorkInfoCheckFailed, 9700004, lambda: app.is_last_work_time_out(99))

    changed = one_shot(13)
    changed.battery_level = 500
    refused(bg.ParameterError, 401, lambda: app.start_work(changed))
    refused(bg.ParameterError, 401, lambda: app.start_work({"work_id": 13}))  # type: ignore[arg-type]
    refused(bg.ParameterError, 401, lambda: app.get_work_status("1"))  # type: ignore[arg-type]
    refused(bg.ParameterError, 401, lambda: app.stop_work(1, need_cancel="yes"))  # type: ignore[arg-type]
    refused(bg.ParameterError, 401, lambda: app.is_last_work_time_out(-1))

    assert work_ids(app) == list(range(1, 11))
    assert app.is_last_work_time_out(1) is False  # exists, never ran


def test_every_field_round_trips(app: bg.BackgroundApp) -> None:
    """get_work_status and obtain_all_works return copies equal to what was started (bundle
    name filled in), enums as enums, parameters exactly (floats JSON could round)."""
    full = bg.WorkInfo(
        work_id=2**31 - 1,
        ability_name="record",
        network_type=bg.NetworkType.WIFI_P2P,
        is_charging=True,
        charger_type=bg.ChargingType.WIRELESS,
        battery_level=42,
        battery_status=bg.BatteryStatus.LOW_OR_OKAY,
        storage_request=bg.StorageRequest.OKAY,
        is_repeat=True,
        repeat_cycle_time=3_600_000,
        repeat_count=7,
        is_persisted=True,
        is_deep_idle=True,
        idle_wait_time=120_000,
        parameters={"n": 1, "pi": 3.141592653589793, "x": 0.1 + 0.2, "s": 'é/"x"', "b": False},
    )
    minimal = bg.WorkInfo(0, "record", storage_request=2)  # HarmonyOS numbers are accepted
    app.start_work(full)
    app.start_work(minimal)
    expected_full = bg.WorkInfo(**{**vars(full), "bundle_name": APP_ID})
    expected_minimal = bg.WorkInfo(**{**vars(minimal), "bundle_name": APP_ID})
    assert app.get_work_status(full.work_id) == expected_full
    assert app.obtain_all_works() == [expected_minimal, expected_full]
    got = app.get_work_status(0)
    assert got.storage_request is bg.StorageRequest.LOW_OR_OKAY
    assert got.network_type is None and got.parameters == {}
    # Copies: changing one changes nothing stored.
    got.parameters["k"] = 1
    assert app.get_work_status(0).parameters == {}
    app.stop_work(full, need_cancel=True)
    assert work_ids(app) == [0]
    app.stop_and_clear_works()
    assert app.obtain_all_works() == []


def test_matches_work_maps_every_condition_key() -> None:
    """DESIGN.md §2's table: network (ANY needs some network), external_power and charger
    (mains counts as ac), battery_level at least, battery/storage status (LOW_OR_OKAY takes
    both), idle; keys a worker does not report take their safe values."""
    cases: list[tuple[dict[str, Any], dict[str, str], bool]] = [
        ({"network_type": bg.NetworkType.ANY}, {"network": "mobile"}, True),
        ({"network_type": bg.NetworkType.ANY}, {"network": "none"}, False),
        ({"network_type": bg.NetworkType.ANY}, {}, True),  # safe default: any
        ({"network_type": bg.NetworkType.WIFI}, {"network": "wifi"}, True),
        ({"network_type": bg.NetworkType.WIFI}, {"network": "ethernet"}, False),
        ({"network_type": bg.NetworkType.WIFI}, {"network": "any"}, False),
        ({"network_type": bg.NetworkType.WIFI_P2P}, {"network": "wifi_p2p"}, True),
        ({"network_type": bg.NetworkType.BLUETOOTH}, {"network": "bluetooth"}, True),
        ({"is_charging": True}, {"external_power": "false"}, False),
        ({"is_charging": True}, {}, True),  # safe default: on mains
        ({"is_charging": True, "charger_type": bg.ChargingType.ANY}, {"charger": "usb"}, True),
        ({"is_charging": True, "charger_type": bg.ChargingType.USB}, {"charger": "usb"}, True),
        ({"is_charging": True, "charger_type": bg.ChargingType.USB}, {"charger": "ac"}, False),
        ({"is_charging": True, "charger_type": bg.ChargingType.AC}, {}, True),  # mains
        (
            {"is_charging": True, "charger_type": bg.ChargingType.WIRELESS},
            {"external_power": "false", "charger": "wireless"},
            False,
        ),
        ({"battery_level": 50}, {"battery_level": "50"}, True),
        ({"battery_level": 50}, {"battery_level": "49"}, False),
        ({"battery_level": 100}, {}, True),  # no battery: full
        ({"battery_status": bg.BatteryStatus.LOW}, {"battery_status": "low"}, True),
        ({"battery_status": bg.BatteryStatus.LOW}, {"battery_status": "okay"}, False),
        ({"battery_status": bg.BatteryStatus.OKAY}, {"battery_status": "low"}, False),
        ({"battery_status": bg.BatteryStatus.LOW_OR_OKAY}, {"battery_status": "low"}, True),
        ({"storage_request": bg.StorageRequest.LOW}, {"storage": "okay"}, False),
        ({"storage_request": bg.StorageRequest.OKAY}, {"storage": "okay"}, True),
        ({"storage_request": bg.StorageRequest.LOW_OR_OKAY}, {"storage": "low"}, True),
        ({"is_deep_idle": True}, {"idle": "true"}, True),
        ({"is_deep_idle": True}, {"idle": "false"}, False),
        ({"is_deep_idle": True, "idle_wait_time": 60_000}, {"idle": "true"}, True),
        ({"is_repeat": True, "repeat_cycle_time": CYCLE_MS}, {"network": "none"}, True),
    ]
    for fields, conditions, expected in cases:
        work = bg.WorkInfo(1, "record", **fields)
        assert matches_work(conditions, work) is expected, (fields, conditions)


# --- routing by conditions -------------------------------------------------------------


def test_work_waits_for_a_worker_that_matches(fast: Cluster, app: bg.BackgroundApp) -> None:
    """A wifi + charging work does not start on an ethernet worker nor on an unplugged wifi
    worker, and starts as soon as a plugged-in wifi worker joins."""
    client = fast.client
    worker(fast, "wEthernet", "network=ethernet", "external_power=true")
    worker(fast, "wUnplugged", "network=wifi", "external_power=false")
    fast.beat()
    app.start_work(bg.WorkInfo(1, "record", network_type=bg.NetworkType.WIFI, is_charging=True))
    # A barrier: work 2, started later and runnable anywhere, has run; beat has matched
    # work 1 against both workers by then.
    app.start_work(bg.WorkInfo(2, "record", network_type=bg.NetworkType.ANY))
    wait_for(lambda: events(client, "end", 2), 20, "the barrier work to run")
    assert events(client, work_id=1) == []
    assert app.get_work_status(1).network_type is bg.NetworkType.WIFI

    worker(fast, "wWifi", "network=wifi", "external_power=true")
    start = wait_for(lambda: events(client, "start", 1), 15, "work 1 on the wifi worker")
    assert [e["worker"] for e in start] == ["wWifi"]
    assert start[0]["bundle"] == APP_ID
    wait_for(lambda: work_ids(app) == [], 10, "the one-shot works to be done")


def test_every_condition_key_routes_to_the_matching_worker(
    fast: Cluster, app: bg.BackgroundApp
) -> None:
    """Ten works, each needing one value of one condition key, run only on the one of two
    workers that has it; a deep-idle work with idle_wait_time waits that long on an idle
    worker, one without starts at once."""
    client = fast.client
    low = ("network=mobile", "charger=usb", "battery_level=30", "battery_status=low")
    low += ("storage=low", "idle=false", "external_power=true")
    high = ("network=ethernet", "charger=ac", "battery_level=90", "battery_status=okay")
    high += ("storage=okay", "idle=true", "external_power=true")
    expected = {
        1: ("wLow", {"network_type": bg.NetworkType.MOBILE}),
        2: ("wHigh", {"network_type": bg.NetworkType.ETHERNET}),
        3: ("wLow", {"is_charging": True, "charger_type": bg.ChargingType.USB}),
        4: ("wHigh", {"is_charging": True, "charger_type": bg.ChargingType.AC}),
        5: ("wHigh", {"battery_level": 50}),
        6: ("wLow", {"battery_status": bg.BatteryStatus.LOW}),
        7: ("wHigh", {"battery_status": bg.BatteryStatus.OKAY}),
        8: ("wLow", {"storage_request": bg.StorageRequest.LOW}),
        9: ("wHigh", {"is_deep_idle": True}),
        10: ("wHigh", {"is_deep_idle": True, "idle_wait_time": 1500}),
    }
    fast.beat()
    for work_id, (_, fields) in expected.items():
        app.start_work(bg.WorkInfo(work_id, "record", **fields))
    worker(fast, "wLow", *low, concurrency=2)
    worker(fast, "wHigh", *high, concurrency=2)
    joined = time.time()  # wHigh's heartbeat is live: beat sees it idle from about now
    wait_for(lambda: len(events(client, "end")) == 10, 20, "all ten works to run")
    ran = {e["id"]: e for e in events(client, "start")}
    assert {i: ran[i]["worker"] for i in expected} == {i: w for i, (w, _) in expected.items()}
    assert ran[10]["t"] >= joined + 1.5 - SLACK, ran[10]["t"] - joined
    assert ran[9]["t"] < ran[10]["t"] - 0.5
    assert len(events(client, "start")) == 10  # each ran once
    wait_for(lambda: work_ids(app) == [], 10, "the one-shot works to be done")


# --- repeats, run limit, stop ------------------------------------------------------------


def test_repeat_cycle_count_run_limit_and_missing_handler(
    fast: Cluster, app: bg.BackgroundApp
) -> None:
    """A repeating work runs repeat_count times, repeat_cycle_time apart, then is removed;
    repeat_count alone also repeats. A run over the run limit gets on_work_stop and is
    ended: is_last_work_time_out is True, False for runs that ended in time. A work no live
    worker has the handler for waits: it is never sent to a worker that cannot run it."""
    client = fast.client
    proc = worker(fast, "w1", concurrency=4)
    fast.beat()
    app.start_work(repeating(1, repeat_count=3))
    app.start_work(bg.WorkInfo(2, "record", repeat_count=2, repeat_cycle_time=CYCLE_MS))
    app.start_work(one_shot(3, parameters={"sleep": 30}))  # ignores on_work_stop
    app.start_work(one_shot(4, parameters={"sleep": 30, "cooperative": True}))
    app.start_work(one_shot(5, parameters={"sleep": 0.2}))
    app.start_work(bg.WorkInfo(6, "no-such-handler", battery_level=0))
    wait_for(lambda: work_ids(app) == [6], 20, "every work it can run to be done")

    starts = [e["t"] for e in events(client, "start", 1)]
    assert len(starts) == 3 and len(events(client, "end", 1)) == 3
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert all(CYCLE_MS / 1000 - SLACK <= gap < CYCLE_MS / 1000 + 1.5 for gap in gaps), gaps
    assert len(events(client, "start", 2)) == 2

    for work_id in (3, 4):
        started = events(client, "start", work_id)[0]["t"]
        stopped = events(client, "stop", work_id)
        assert len(stopped) == 1
        # The limit runs from just before on_work_start records its start.
        assert RUN_LIMIT - 0.5 <= stopped[0]["t"] - started <= RUN_LIMIT + 1, work_id
        assert app.is_last_work_time_out(work_id) is True
    assert events(client, "end", 3) == []  # terminated after on_work_stop
    assert len(events(client, "end", 4)) == 1  # returned by itself after on_work_stop
    for work_id in (1, 2, 5, 6):
        assert app.is_last_work_time_out(work_id) is False
    assert events(client, work_id=6) == []
    assert "no-such-handler" not in proc.log()  # never offered to this worker
    app.stop_work(6, need_cancel=True)


def test_slow_on_work_stop_holds_neither_the_lease_nor_the_run_limit(
    fast: Cluster, app: bg.BackgroundApp
) -> None:
    """An on_work_stop that takes 4 s, longer than the 1.5 s run lease, runs in a thread of
    its own: at the 2 s run limit the body gets STOP_GRACE to return, then the run is
    recorded timed out and its body killed, once; the work never runs a second time.
    (When on_work_stop ran on the watchdog thread, the lease lapsed meanwhile and beat ran
    the work again.)"""
    client = fast.client
    worker(fast, "w1")
    fast.beat()
    app.start_work(one_shot(1, parameters={"sleep": 30, "cooperative": True, "stop_sleep": 4}))
    begun = wait_for(lambda: events(client, "start", 1), 15, "the run")[0]
    wait_for(lambda: work_ids(app) == [], 10, "the run's end to be recorded")
    last = json.loads(client.hget(f"bgqueue:{{{APP_ID}}}:work:last", "1") or b"{}")
    took = (last["fa"] - last["sa"]) / 1000
    assert RUN_LIMIT <= took <= RUN_LIMIT + 1.0 + 0.5, f"recorded after {took:.2f}s"
    assert app.is_last_work_time_out(1) is True
    wait_for(lambda: time.time() >= begun["t"] + RUN_LIMIT + 4.5, 10, "on_work_stop's 4 s")
    assert len(events(client, "start", 1)) == 1
    assert events(client, "end", 1) == []  # killed before its slow wrap-up released it


def test_rolling_deploy_runs_a_work_only_where_its_extension_is(
    fast: Cluster, app: bg.BackgroundApp
) -> None:
    """An old build without the work's extension never gets the work: it waits; a new build
    joins and runs it once. (Before, the old worker took it and ended it as failed.)"""
    client = fast.client
    worker(fast, "old", env={"TEST_OMIT": "record"})
    fast.beat()
    app.start_work(one_shot(1))
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert events(client, "start", 1) == [] and work_ids(app) == [1]
        time.sleep(0.05)
    worker(fast, "new")
    ran = wait_for(lambda: events(client, "end", 1), 15, "the run on the new build")
    assert [e["worker"] for e in events(client, "start", 1)] == ["new"] == [ran[0]["worker"]]
    wait_for(lambda: work_ids(app) == [], 10, "the one-shot work to be done")


def test_stop_work_keeps_a_repeating_work_cancel_removes_it(
    fast: Cluster, app: bg.BackgroundApp
) -> None:
    """stop_work on a running repeating work calls on_work_stop and the work runs again at
    its next cycle; need_cancel=True calls on_work_stop and removes the work; then
    stop_and_clear_works stops a running work and removes every work."""
    client = fast.client
    worker(fast, "w1", concurrency=2)
    fast.beat()
    long_run = {"sleep": 30, "cooperative": True}
    info = repeating(1, parameters=long_run)
    app.start_work(info)
    first = wait_for(lambda: events(client, "start", 1), 15, "the first run")[0]
    app.stop_work(info)
    wait_for(lambda: events(client, "stop", 1), 5, "on_work_stop of the first run")
    second = wait_for(lambda: events(client, "start", 1)[1:], 10, "the next cycle")[0]
    assert second["t"] >= first["t"] + CYCLE_MS / 1000 - SLACK
    assert app.is_last_work_time_out(1) is False  # stopped, not timed out
    assert work_ids(app) == [1]

    app.stop_work(1, need_cancel=True)
    wait_for(lambda: len(events(client, "stop", 1)) == 2, 5, "on_work_stop of the second run")
    refused(bg.WorkInfoCheckFailed, 9700004, lambda: app.get_work_status(1))
    refused(bg.WorkInfoCheckFailed, 9700004, lambda: app.is_last_work_time_out(1))

    app.start_work(one_shot(2, parameters=long_run))
    app.start_work(one_shot(3, network_type=bg.NetworkType.BLUETOOTH))  # never matches
    wait_for(lambda: events(client, "start", 2), 15, "work 2 to run")
    app.stop_and_clear_works()
    wait_for(lambda: events(client, "stop", 2), 5, "on_work_stop of work 2")
    assert app.obtain_all_works() == []
    refused(bg.WorkInfoCheckFailed, 9700004, lambda: app.is_last_work_time_out(2))
    # The cancelled repeating work never ran again (its record is gone, so it cannot).
    assert len(events(client, "start", 1)) == 2


def test_efficiency_grants_lift_the_interval_minimum_and_the_run_limit(
    fast: Cluster, app: bg.BackgroundApp
) -> None:
    """TIMER lets a work repeat more often than min_repeat_interval; WORK_SCHEDULER lets a
    run last past work_run_limit (1200 s charging / 600 s otherwise)."""
    client = fast.client
    fast_cycle = repeating(1, repeat_cycle_time=300, repeat_count=3)
    refused(bg.StartWorkFailed, 9700005, lambda: app.start_work(fast_cycle))
    grant = bg.ResourceType.TIMER | bg.ResourceType.WORK_SCHEDULER
    app.apply_efficiency_resources(
        bg.EfficiencyResourcesRequest(
            resource_types=grant, is_apply=True, time_out=120_000, reason="test"
        )
    )
    app.start_work(fast_cycle)
    app.start_work(one_shot(2, parameters={"sleep": RUN_LIMIT + 1}))
    worker(fast, "w1", concurrency=2)
    fast.beat()
    wait_for(lambda: work_ids(app) == [], 20, "both works to be done")
    starts = [e["t"] for e in events(client, "start", 1)]
    assert len(starts) == 3
    assert starts[-1] - starts[0] < 2 * CYCLE_MS / 1000  # three runs 0.3 s apart
    assert events(client, "stop", 2) == [] and len(events(client, "end", 2)) == 1
    assert app.is_last_work_time_out(2) is False


# --- lost workers and restarts -------------------------------------------------------------


def test_a_run_whose_worker_dies_runs_again(fast: Cluster, app: bg.BackgroundApp) -> None:
    """A worker SIGKILLed mid-run: beat's sweep finds the run's lease lapsed and the work
    runs again on another worker; is_last_work_time_out stays False."""
    client = fast.client
    doomed = worker(fast, "wA")
    fast.beat()
    app.start_work(one_shot(1, parameters={"sleep": 1}))
    wait_for(lambda: events(client, "start", 1), 15, "the run on wA")
    doomed.kill()
    worker(fast, "wB")
    rerun = wait_for(lambda: events(client, "end", 1), 15, "the rerun on wB")
    assert [e["worker"] for e in events(client, "start", 1)] == ["wA", "wB"]
    assert rerun[0]["worker"] == "wB"
    wait_for(lambda: work_ids(app) == [], 10, "the work to be done")
    assert app.is_last_work_time_out(1) is False


def test_persisted_repeating_work_survives_a_full_restart(
    make_redis_server: Callable[..., RedisServer], tmp_path: Path
) -> None:
    """Worker and beat SIGKILLed, Redis SIGKILLed and restarted from its AOF: the persisted
    repeating work is still there and new worker + beat processes keep running it every
    cycle; the work that was not persisted is gone and never runs again."""
    server = make_redis_server(appendfsync="always")
    group = Cluster(server.url, tmp_path)
    try:
        first_worker = worker(group, "w1", concurrency=2)
        first_beat = group.beat()
        app = producer(server.url)
        kept = repeating(1, is_persisted=True, parameters={"sleep": 0.3})
        app.start_work(kept)
        app.start_work(repeating(2))
        wait_for(
            lambda: len(events(group.client, "end", 1)) >= 2 and events(group.client, "end", 2),
            20,
            "both works to repeat",
        )
        first_worker.kill()
        first_beat.kill()
        server.kill()
        server.restart()
        restarted = time.time()

        fresh = producer(server.url)
        assert fresh.obtain_all_works() == [bg.WorkInfo(**{**vars(kept), "bundle_name": APP_ID})]
        refused(bg.WorkInfoCheckFailed, 9700004, lambda: fresh.get_work_status(2))
        refused(bg.WorkInfoCheckFailed, 9700004, lambda: fresh.is_last_work_time_out(2))

        client = redis.Redis.from_url(server.url)
        worker(group, "w2", concurrency=2)
        group.beat("beat2")

        def after(work_id: int) -> list[dict[str, Any]]:
            return [e for e in events(client, "start", work_id) if e["t"] > restarted]

        runs = wait_for(lambda: after(1)[2:], 20, "three runs after the restart")
        assert {e["worker"] for e in runs} == {"w2"}
        assert after(2) == []
        assert work_ids(fresh) == [1]
        client.close()
    finally:
        _kill_all(group)
        group.stop_all()
