"""Efficiency resources: system-app checks, typed refusals, grants with automatic release,
and their effects on real workers (priority lane, warning cap, has_resource)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from kombu.transport import redis as kombu_redis

import bgqueue as bg
from bgqueue import efficiency
from bgqueue.model.keys import AppKeys
from bgqueue.worker.celery_config import celery_config
from tests.apps import efficient
from tests.harness import Cluster, wait_for

EFFICIENT_APP = "tests.apps.efficient:app"
JOB = f"{efficient.APP_ID}.job"
PROBE = f"{efficient.APP_ID}.probe"
WARNED = f"{efficient.APP_ID}.warned"
R = bg.ResourceType


@pytest.fixture
def system_app(redis_url: str) -> bg.BackgroundApp:
    """The system test app as a producer sees it, on the emptied test Redis."""
    efficient.app._client = None  # a previous test's connection points at the same server
    efficient.app.use_broker(redis_url)
    return efficient.app


@pytest.fixture
def plain_app(redis_url: str) -> bg.BackgroundApp:
    """A non-system app on the test Redis."""
    return bg.BackgroundApp("com.bgqueue.plain", broker_url=redis_url)


def request(
    types: int = R.CPU, time_out: int = 60_000, **options: Any
) -> bg.EfficiencyResourcesRequest:
    options.setdefault("is_apply", True)
    options.setdefault("reason", "test")
    return bg.EfficiencyResourcesRequest(resource_types=types, time_out=time_out, **options)


def held(app: bg.BackgroundApp) -> dict[tuple[str | None, bool], bg.EfficiencyResourcesInfo]:
    """The app's grants by (type name, process level)."""
    return {(i.resource_types.name, i.is_for_process): i for i in app.all_efficiency_resources()}


def events(client: redis.Redis, event: str | None = None) -> list[dict[str, Any]]:
    found = [json.loads(raw) for raw in client.lrange(efficient.EVENTS, 0, -1)]
    return [e for e in found if event is None or e["event"] == event]


def queued(client: redis.Redis, app: bg.BackgroundApp, lane: int | None = None) -> int:
    """Messages waiting in the queues of the app's worker classes (one priority step, or all
    of them)."""
    classes = [c.decode() for c in client.zrange(app.keys.classlive, 0, -1)]
    lists = [name for c in classes for name in app.keys.queue_lists(app.keys.class_queue(c))]
    if lane is not None:
        steps = len(app.keys.KOMBU_PRIORITY_STEPS)
        lists = lists[app.keys.KOMBU_PRIORITY_STEPS.index(lane) :: steps]
    return sum(client.llen(name) for name in lists)


def submit(app: bg.BackgroundApp, scope: str, identifier: str = JOB, **payload: Any) -> None:
    kind = bg.AppRefreshTaskRequest if identifier == WARNED else bg.ProcessingTaskRequest
    app.scheduler_for(scope).submit(kind(identifier, payload=payload or None))


# --- refusals --------------------------------------------------------------------------


def test_non_system_app_is_refused_and_nothing_is_written(
    plain_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    calls: list[Callable[[], object]] = [
        lambda: plain_app.apply_efficiency_resources(request()),
        plain_app.reset_all_efficiency_resources,
        plain_app.all_efficiency_resources,
    ]
    for call in calls:
        with pytest.raises(bg.NotSystemApp) as caught:
            call()
        assert caught.value.code == 202
    assert not efficiency.granted(plain_app, R.CPU)
    assert redis_client.keys("*") == []


@pytest.mark.parametrize("types", [0, -1, 512, R.GPS | 512, 1 << 40])
def test_bad_resource_types_are_18700001(system_app: bg.BackgroundApp, types: int) -> None:
    with pytest.raises(bg.EfficiencyResourceVerificationFailed) as caught:
        system_app.apply_efficiency_resources(request(types))
    assert caught.value.code == 18700001


@pytest.mark.parametrize(
    "fields",
    [
        {"types": "1"},
        {"types": True},
        {"time_out": 0},
        {"time_out": -1},
        {"time_out": 1.5},
        {"time_out": True},
        {"time_out": 2**31},
        {"reason": None},
        {"reason": 7},
        {"reason": "x" * 1025},
        {"is_apply": 1},
        {"is_persist": "yes"},
        {"is_process": None},
    ],
)
def test_bad_arguments_are_401(system_app: bg.BackgroundApp, fields: dict[str, Any]) -> None:
    with pytest.raises(bg.ParameterError) as caught:
        system_app.apply_efficiency_resources(request(**fields))
    assert caught.value.code == 401


def test_refusals_at_apply_write_nothing(
    system_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """A request spoiled after construction, a foreign object, a process-level grant with
    no live worker and a process-level WORK_SCHEDULER are all refused before any write."""
    spoiled = request(R.GPS)
    spoiled.resource_types = 0
    with pytest.raises(bg.EfficiencyResourceVerificationFailed):
        system_app.apply_efficiency_resources(spoiled)
    with pytest.raises(bg.ParameterError):
        system_app.apply_efficiency_resources({"resource_types": 1})  # type: ignore[arg-type]
    with pytest.raises(bg.EfficiencyResourceVerificationFailed, match="live worker"):
        system_app.apply_efficiency_resources(request(R.GPS, is_process=True))
    with pytest.raises(bg.EfficiencyResourceVerificationFailed, match="WORK_SCHEDULER"):
        system_app.apply_efficiency_resources(request(R.WORK_SCHEDULER, is_process=True))
    with pytest.raises(bg.ParameterError):
        efficiency.granted(system_app, R.CPU | R.GPS)
    assert redis_client.keys("*") == []


def test_time_out_is_ignored_for_persistent_grants_and_releases(
    system_app: bg.BackgroundApp,
) -> None:
    system_app.apply_efficiency_resources(request(R.AUDIO, time_out=0, is_persist=True))
    system_app.apply_efficiency_resources(request(R.AUDIO, time_out=0, is_apply=False))
    assert system_app.all_efficiency_resources() == []


# --- grants ----------------------------------------------------------------------------


def test_apply_list_release_and_reset(system_app: bg.BackgroundApp) -> None:
    before = datetime.now(UTC)
    system_app.apply_efficiency_resources(request(R.CPU | R.TIMER | R.GPS, reason="sync"))
    grants = held(system_app)
    assert set(grants) == {("CPU", False), ("TIMER", False), ("GPS", False)}
    cpu = grants["CPU", False]
    assert (cpu.timeout, cpu.is_persistent, cpu.reason) == (60_000, False, "sync")
    assert cpu.expires_at is not None
    assert before + timedelta(seconds=55) < cpu.expires_at < before + timedelta(seconds=65)
    assert efficiency.granted(system_app, R.TIMER)
    assert not efficiency.granted(system_app, R.WORK_SCHEDULER)

    system_app.apply_efficiency_resources(request(R.TIMER, is_apply=False, time_out=0))
    assert set(held(system_app)) == {("CPU", False), ("GPS", False)}
    assert not efficiency.granted(system_app, R.TIMER)

    system_app.reset_all_efficiency_resources()
    assert system_app.all_efficiency_resources() == []
    assert not efficiency.granted(system_app, R.CPU)


def test_applying_again_keeps_the_later_end_and_sticky_persistence(
    system_app: bg.BackgroundApp,
) -> None:
    """As HarmonyOS merges grants: the reason is replaced, the end is the later one, and a
    persistent grant stays persistent until released."""
    system_app.apply_efficiency_resources(request(R.CPU, time_out=60_000, reason="first"))
    end = held(system_app)["CPU", False].expires_at
    system_app.apply_efficiency_resources(request(R.CPU, time_out=1_000, reason="second"))
    cpu = held(system_app)["CPU", False]
    assert (cpu.expires_at, cpu.reason) == (end, "second")

    system_app.apply_efficiency_resources(request(R.GPS, is_persist=True))
    system_app.apply_efficiency_resources(request(R.GPS, time_out=1_000))
    gps = held(system_app)["GPS", False]
    assert (gps.is_persistent, gps.expires_at, gps.timeout) == (True, None, 0)


def test_grants_are_released_at_their_time_out_unless_persistent(
    system_app: bg.BackgroundApp,
) -> None:
    system_app.apply_efficiency_resources(request(R.CPU | R.BLUETOOTH, time_out=1_000))
    system_app.apply_efficiency_resources(request(R.SENSOR, time_out=1_000, is_persist=True))
    assert efficiency.granted(system_app, R.CPU)
    wait_for(lambda: not efficiency.granted(system_app, R.CPU), 10, "the CPU grant's release")
    assert set(held(system_app)) == {("SENSOR", False)}
    assert efficiency.granted(system_app, R.SENSOR)


# --- effects on real workers -----------------------------------------------------------


def test_handlers_see_grants_and_process_grants_end_with_the_last_worker(
    cluster: Cluster, system_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    worker = cluster.worker("w1", concurrency=1, app=EFFICIENT_APP, app_id=efficient.APP_ID)
    cluster.beat()
    system_app.apply_efficiency_resources(request(R.GPS | R.COMMON_EVENT))
    submit(system_app, "with", PROBE)
    wait_for(lambda: events(redis_client, "probe"), 20, "the first probe")
    system_app.reset_all_efficiency_resources()
    submit(system_app, "without", PROBE)
    probes = wait_for(lambda: events(redis_client, "probe")[1:], 20, "the second probe")
    seen = {e["scope"]: e["held"] for e in events(redis_client, "probe")}
    assert seen == {"with": ["COMMON_EVENT", "GPS"], "without": []}, probes

    # Process-level grants need a live worker, sit beside app-level ones, and go with the
    # processes: an app-level release takes them too, and so does the last worker leaving.
    system_app.apply_efficiency_resources(request(R.AUDIO | R.SENSOR, is_process=True))
    system_app.apply_efficiency_resources(request(R.AUDIO))
    assert set(held(system_app)) == {("AUDIO", True), ("SENSOR", True), ("AUDIO", False)}
    system_app.apply_efficiency_resources(request(R.SENSOR, is_apply=False, is_process=True))
    assert set(held(system_app)) == {("AUDIO", True), ("AUDIO", False)}
    system_app.apply_efficiency_resources(request(R.AUDIO, is_apply=False))
    assert held(system_app) == {}

    system_app.apply_efficiency_resources(request(R.GPS, is_process=True, is_persist=True))
    system_app.apply_efficiency_resources(request(R.TIMER, is_persist=True))
    worker.stop()
    wait_for(lambda: ("GPS", True) not in held(system_app), 15, "the process grant's release")
    assert set(held(system_app)) == {("TIMER", False)}


def test_cpu_grant_puts_requests_ahead_of_those_waiting(
    cluster: Cluster, system_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """One busy single-process worker, three requests waiting: a request submitted after
    the app applied for CPU runs before them; without the grant, the order is FIFO."""
    cluster.worker("w1", concurrency=1, app=EFFICIENT_APP, app_id=efficient.APP_ID)
    cluster.beat()

    def run_round(round_: str, with_cpu: bool) -> list[str]:
        redis_client.delete(efficient.GATE, efficient.EVENTS)
        system_app.reset_all_efficiency_resources()
        submit(system_app, f"{round_}0-hold", hold=True)
        wait_for(lambda: events(redis_client, "start"), 20, "the holding request to start")
        for n in range(1, 4):
            submit(system_app, f"{round_}{n}")
        wait_for(lambda: queued(redis_client, system_app) == 3, 20, "three waiting requests")
        if with_cpu:
            system_app.apply_efficiency_resources(request(R.CPU))
        submit(system_app, f"{round_}4-late")
        wait_for(lambda: queued(redis_client, system_app) == 4, 20, "the late request queued")
        lane = efficiency.PRIORITY_LANE if with_cpu else efficiency.NORMAL_LANE
        assert queued(redis_client, system_app, lane) == (1 if with_cpu else 4)
        redis_client.set(efficient.GATE, 1)
        wait_for(lambda: len(events(redis_client, "end")) == 5, 30, "all five runs")
        return [e["scope"] for e in events(redis_client, "start")]

    assert run_round("a", with_cpu=True) == ["a0-hold", "a4-late", "a1", "a2", "a3"]
    assert run_round("b", with_cpu=False) == ["b0-hold", "b1", "b2", "b3", "b4-late"]


def test_cpu_grant_lifts_the_warning_cap(
    cluster: Cluster, system_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """Refresh budget 4 s, expiration_warning 3 s: capped at budget/5 the handler runs 0.8 s
    before the deadline (3.2 s in); with CPU it runs the full 3 s before (1 s in)."""
    cluster.worker("w1", concurrency=2, app=EFFICIENT_APP, app_id=efficient.APP_ID)
    cluster.beat()
    submit(system_app, "capped", WARNED)
    wait_for(lambda: events(redis_client, "start"), 20, "the capped run to start")
    system_app.apply_efficiency_resources(request(R.CPU))
    submit(system_app, "lifted", WARNED)
    wait_for(lambda: len(events(redis_client, "expiration")) == 2, 20, "both expirations")
    started = {e["scope"]: e["t"] for e in events(redis_client, "start")}
    warned = {e["scope"]: e["t"] - started[e["scope"]] for e in events(redis_client, "expiration")}
    assert warned["lifted"] < 2.1 < warned["capped"], warned
    assert warned["capped"] < 4, warned  # still before the deadline


# --- the pieces that must agree with others ---------------------------------------------


def test_resource_types_and_kombu_layout_match_their_sources() -> None:
    """ResourceType values are HarmonyOS's; queue_lists names kombu's priority lists."""
    assert {t.name: int(t) for t in R} == {
        "CPU": 1,
        "COMMON_EVENT": 2,
        "TIMER": 4,
        "WORK_SCHEDULER": 8,
        "BLUETOOTH": 16,
        "GPS": 32,
        "AUDIO": 64,
        "RUNNING_LOCK": 128,
        "SENSOR": 256,
    }
    assert tuple(int(t) for t in R) == AppKeys.RESOURCE_BITS
    assert kombu_redis.Channel.sep == AppKeys.KOMBU_SEP
    # bgqueue gives kombu two of its priority steps (celery_config), one per lane.
    steps = celery_config("redis://x")["broker_transport_options"]["priority_steps"]
    assert steps == list(AppKeys.KOMBU_PRIORITY_STEPS)
    assert set(steps) <= set(kombu_redis.PRIORITY_STEPS)
    channel: Any = type("Steps", (), {"priority_steps": steps})()
    channel.sep = kombu_redis.Channel.sep
    channel.priority = lambda n: kombu_redis.Channel.priority(channel, n)
    app_keys = AppKeys("x")
    name = app_keys.class_queue("c")
    expected = [kombu_redis.Channel._q_for_pri(channel, name, step) for step in steps]
    assert app_keys.queue_lists(name) == expected
    lanes = {efficiency.PRIORITY_LANE, efficiency.NORMAL_LANE}
    assert {kombu_redis.Channel.priority(channel, lane) for lane in lanes} == lanes
    assert steps.index(efficiency.PRIORITY_LANE) == 0  # served first
