"""The `bgqueue` command line and `celery -A MODULE:app.celery ...`, run as real subprocesses
against the test Redis: commands print what they did, errors are one line."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest
import redis

import bgqueue as bg
from bgqueue.broker.embedded import free_port
from bgqueue.model import keys
from tests.harness import APP_ID, FAST, SAMPLE_APP, Cluster, events, wait_for

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "com.bgqueue.test."
COMMANDS = ("beat", "cancel", "demo", "flower", "pending", "simulate", "status", "submit", "worker")


def cli(redis_url: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run `python -m bgqueue ARGS` from the repository root with the test broker."""
    env = {**os.environ, **FAST, "BGQUEUE_BROKER_URL": redis_url}
    env.pop("PYTEST_CURRENT_TEST", None)
    return subprocess.run(
        [sys.executable, "-m", "bgqueue", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    """The stdout of a command that must have succeeded cleanly."""
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    return done.stdout


def pending_by_id(app: bg.BackgroundApp, scope: str = "default") -> dict[str, bg.BGTaskRequest]:
    return {r.identifier: r for r in app.scheduler_for(scope).pending_task_requests()}


# --- producer commands ---------------------------------------------------------------


def test_submit_pending_and_cancel_do_and_print_what_they_did(
    redis_url: str, sample_app: bg.BackgroundApp
) -> None:
    """`submit` stores the request as given (kind, date, flags, payload, scope), `pending`
    lists it, `cancel IDENT` and `cancel --all` remove exactly what they report."""
    a, b, c = (PREFIX + n for n in ("a", "b", "c"))
    before = datetime.now(UTC)
    out = ok(
        cli(redis_url, "submit", "--app", SAMPLE_APP, a, "--in", "3600", "--payload", '{"n": 1}')
    )
    assert out.strip() == f"submitted {a} (processing) in scope default"
    out = ok(
        cli(
            redis_url,
            "submit",
            "--app",
            SAMPLE_APP,
            "--scope",
            "dev-1",
            b,
            "--kind",
            "refresh",
            "--network",
            "--power",
        )
    )
    assert out.strip() == f"submitted {b} (refresh) in scope dev-1"
    ok(cli(redis_url, "submit", "--app", SAMPLE_APP, "--scope", "dev-1", c, "--in", "60"))

    stored = pending_by_id(sample_app)[a]
    assert isinstance(stored, bg.ProcessingTaskRequest) and stored.payload == {"n": 1}
    assert stored.earliest_begin_date is not None
    assert timedelta(seconds=3590) < stored.earliest_begin_date - before < timedelta(seconds=3610)
    refresh = pending_by_id(sample_app, "dev-1")[b]
    assert isinstance(refresh, bg.AppRefreshTaskRequest)
    assert refresh.requires_network_connectivity and refresh.requires_external_power

    lines = ok(cli(redis_url, "pending", "--app", SAMPLE_APP)).splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{a}\tprocessing\tnot before 20")
    assert lines[0].endswith("\t-")
    lines = ok(cli(redis_url, "pending", "--app", SAMPLE_APP, "--scope", "dev-1")).splitlines()
    assert lines[0] == f"{b}\trefresh\tnot before now\tnetwork,power"
    assert lines[1].startswith(f"{c}\tprocessing\tnot before 20")

    assert ok(cli(redis_url, "cancel", "--app", SAMPLE_APP, a)).strip() == "cancelled 1"
    assert ok(cli(redis_url, "cancel", "--app", SAMPLE_APP, a)).strip() == "cancelled 0"
    assert pending_by_id(sample_app) == {}
    cancelled = sample_app.scheduler.history()
    assert [(r.identifier, r.state) for r in cancelled] == [(a, "cancelled")]

    out = ok(cli(redis_url, "cancel", "--app", SAMPLE_APP, "--scope", "dev-1", "--all"))
    assert out.strip() == "cancelled 2"
    assert pending_by_id(sample_app, "dev-1") == {}
    assert ok(cli(redis_url, "pending", "--app", SAMPLE_APP, "--scope", "dev-1")) == ""


def test_simulate_launch_expire_and_status_against_a_live_worker(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_url: str, redis_client: redis.Redis
) -> None:
    """`status` shows the beat leader, the worker with its conditions, pending counts and
    the running task; `simulate launch` starts a far-future request now and `simulate
    expire` calls the running task's expiration handler."""
    slow = PREFIX + "slow"
    cluster.worker(
        "cli-w",
        conditions=["external_power=false"],
        concurrency=1,
        env={"TEST_PROCESSING_BUDGET": "60"},
    )
    beat = cluster.beat()
    wait_for(lambda: redis_client.get(keys.BEAT_LEASE), 15, "beat to lead")
    ok(
        cli(
            redis_url,
            "submit",
            "--app",
            SAMPLE_APP,
            slow,
            "--in",
            "3600",
            "--payload",
            '{"sleep": 30, "expiration": "complete"}',
        )
    )

    report = ok(cli(redis_url, "status"))
    assert f"beat: {socket.gethostname()}:{beat.pid}:" in report
    worker_line = next(line for line in report.splitlines() if "cli-w" in line)
    assert "alive" in worker_line and "busy 0/1" in worker_line
    assert "external_power=false" in worker_line and "data_protection=complete" in worker_line
    assert f"app {APP_ID}" in report
    assert "pending: 1 (not yet due: 1, no capable worker: 0, no handler: 0)" in report
    assert "running: 0" in report
    # The sample app uses none of the HarmonyOS parts: each section says so in one line.
    for section in ("continuous tasks", "transient delays", "efficiency resources", "works"):
        assert f"\n  {section}: none" in report

    out = ok(cli(redis_url, "simulate", "--app", SAMPLE_APP, "launch", slow))
    assert out.strip() == f"launching {slow}"
    start = wait_for(lambda: events(redis_client, "start", slow), 15, "the launched run")[0]
    assert start["worker"] == "cli-w"

    report = ok(cli(redis_url, "status"))
    assert "pending: 0 (not yet due: 0, no capable worker: 0, no handler: 0)" in report
    assert "running: 1" in report
    assert f"#{start['gen']} default/{slow} (processing) on cli-w" in report

    out = ok(cli(redis_url, "simulate", "--app", SAMPLE_APP, "expire", slow))
    assert out.strip() == f"expiring 1 running task(s) of {slow}"
    wait_for(lambda: events(redis_client, "expiration", slow), 10, "the expiration handler")
    record = wait_for(lambda: sample_app.scheduler.history(), 10, "the run's record")[0]
    assert (record.identifier, record.state, record.success) == (slow, "completed", False)
    # Nothing is running now, so there is nothing to expire: an error, not a silent no-op.
    failed = cli(redis_url, "simulate", "--app", SAMPLE_APP, "expire", slow)
    assert failed.returncode != 0 and failed.stderr.startswith("error: no running task")


def test_status_shows_continuous_tasks_transient_delays_efficiency_grants_and_works(
    cluster: Cluster, redis_url: str, redis_client: redis.Redis
) -> None:
    """With a continuous task running, a request holding a transient delay in scope "lab",
    two efficiency grants and a work that has run, `status` shows each in its section: the
    task's modes, worker and progress; the scope's quota left (the app's 50 s, from its
    worker's heartbeat, less the 18 s the delay reserves) and the delay's time left; each
    grant's level, reason and time left or persistence; the work's conditions, next run and
    last run."""
    from tests.apps import status_app

    app_keys = keys.AppKeys(status_app.APP_ID)
    conditions = ["external_power=true", "network=ethernet"]
    cluster.worker(
        "st-w",
        conditions=conditions,
        concurrency=3,
        continuous=True,
        app="tests.apps.status_app:app",
        app_id=status_app.APP_ID,
    )
    cluster.beat()
    app = status_app.producer(redis_url)
    app.start_background_running("download", [bg.BackgroundMode.DATA_TRANSFER])
    app.scheduler_for("lab").submit(bg.ProcessingTaskRequest(status_app.HOLD))
    cpu = bg.EfficiencyResourcesRequest(
        resource_types=bg.ResourceType.CPU, is_apply=True, time_out=60_000, reason="status test"
    )
    timer = bg.EfficiencyResourcesRequest(
        resource_types=bg.ResourceType.TIMER,
        is_apply=True,
        time_out=0,
        reason="short cycles",
        is_persist=True,
    )
    app.apply_efficiency_resources(cpu)
    app.apply_efficiency_resources(timer)
    app.start_work(
        bg.WorkInfo(
            work_id=7,
            ability_name="sync",
            network_type=bg.NetworkType.ANY,
            is_charging=True,
            is_repeat=True,
            repeat_cycle_time=60_000,
        )
    )
    wait_for(
        lambda: [t for t in app.all_continuous_tasks() if t.state == "running" and t.progress],
        20,
        "the continuous task to run and report progress",
    )
    wait_for(lambda: app.transient_task_info("lab").transient_tasks, 20, "the transient delay")
    wait_for(lambda: redis_client.hexists(app_keys.work_last, "7"), 20, "the work's first run")

    lines = ok(cli(redis_url, "status")).splitlines()
    start = lines.index(f"app {status_app.APP_ID}")
    section = lines[start + 1 :]

    def after(title: str) -> str:
        """The line after a section's title line."""
        index = next(i for i, line in enumerate(section) if line.startswith(title))
        return section[index + 1]

    assert "  continuous tasks: 1" in section
    task = after("  continuous tasks:")
    assert task.startswith("    download #") and "  DATA_TRANSFER  running on st-w (pid " in task
    assert "restarts 0  progress " in task and task.endswith("/1000")

    assert "  transient delays (daily quota 50 s per scope, as its workers report):" in section
    delay = after("  transient delays")
    prefix = '    [lab] quota left 32.0 s; delay #1 "hold for status" '
    assert delay.startswith(prefix) and delay.endswith(" s left"), delay
    assert 0 < float(delay[len(prefix) :].split()[0]) <= 20

    assert "  efficiency resources: 2" in section
    grant = after("  efficiency resources:")
    assert grant.startswith('    CPU (app level)  "status test"  ') and grant.endswith(" s left")
    assert 50 < float(grant.split()[-3]) <= 60
    assert section[section.index(grant) + 1] == '    TIMER (app level)  "short cycles"  persistent'

    assert "  works: 1" in section
    work = after("  works:")
    assert work.startswith("    #7 sync  network ANY + charging, every 60.0 s  "), work
    assert "  waiting, next run in " in work
    assert "  last run 1 on st-w took " in work and work.endswith(", in time")

    redis_client.set(status_app.GATE, 1)  # let the held request finish


def home_processes(home: Path) -> list[int]:
    """Pids of live processes started with BGQUEUE_HOME=home (the demo and its children)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get("BGQUEUE_HOME") == str(
                home
            ):
                found.append(proc.pid)
    return found


DEMO_NARRATES = {
    # what: a line the demo must print, as a regular expression
    "a deferred request": r"submit \[default\] cleanup, needs power, not before \+4 s: deferred",
    "it routed and completed": r"\] com\.example\.news\.cleanup \(processing\) completed ✓ "
    r"on mains-worker",
    "an expired request": r"\] com\.example\.news\.export\.pdf \(processing\) EXPIRED",
    "a transient delay granted": r"transient: \[kiosk-7\] suspend delay #\d+ granted \(\d+\.\d s "
    r'left, "finish the daily digest"\): .* quota left 11\d\.\d s',
    "the CPU grant": r"efficiency: CPU granted for 30\.0 s",
    "the continuous task running": r"continuous download: running on mains-worker "
    r"\(DATA_TRANSFER\)",
    "the continuous task stopped": r"continuous download: stopped \(its handler returned\)",
    "a first work run": r"work #1 \(sync\) run 1 on mains-worker took .*, in time",
    "a second work run": r"work #1 \(sync\) run 2 on mains-worker took .*, in time",
}


def test_demo_narrates_all_four_harmony_parts_and_stops_its_processes(
    redis_url: str, tmp_path: Path
) -> None:
    """`bgqueue demo` on the test broker narrates a deferred, routed and completed request,
    an expired one, a transient delay with the quota left, the continuous download running
    then stopped, the CPU grant and repeated work runs; on SIGTERM it stops every process it
    started (none is left with its BGQUEUE_HOME)."""
    home = tmp_path / "home"
    env = {**os.environ, **FAST, "BGQUEUE_BROKER_URL": redis_url, "BGQUEUE_HOME": str(home)}
    env.pop("PYTEST_CURRENT_TEST", None)
    output = tmp_path / "demo.out"
    port = str(free_port())
    with open(output, "wb") as out:
        demo = subprocess.Popen(
            [sys.executable, "-m", "bgqueue", "demo", "--flower-port", port],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def missing() -> list[str]:
        text = output.read_text(errors="replace")
        return [what for what, line in DEMO_NARRATES.items() if not re.search(line, text)]

    try:
        wait_for(lambda: not missing() or demo.poll() is not None, 60, "the demo's narration")
        assert demo.poll() is None and not missing(), output.read_text()
        # Beat, two workers (with their pool processes) and Flower, besides the demo itself.
        assert len(set(home_processes(home)) - {demo.pid}) >= 4
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(30) == 0, output.read_text()
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(10)
    text = output.read_text()
    assert "Traceback" not in text
    assert text.splitlines()[-1].endswith("] stopped beat, workers and Flower")
    wait_for(lambda: not home_processes(home), 10, "every process of the demo to end")


# --- errors --------------------------------------------------------------------------

ERRORS: dict[str, tuple[Callable[[int], list[str]], str]] = {
    "not-permitted": (
        lambda _: ["submit", "--app", SAMPLE_APP, "com.elsewhere.job"],
        "not in the permitted identifiers",
    ),
    "bad-condition-value": (
        lambda _: ["worker", "--app", SAMPLE_APP, "--condition", "network=carrier-pigeon"],
        "condition network must be one of",
    ),
    "bad-condition-shape": (
        lambda _: ["worker", "--app", SAMPLE_APP, "--condition", "external_power"],
        "must look like KEY=VALUE",
    ),
    "bad-payload": (
        lambda _: ["submit", "--app", SAMPLE_APP, PREFIX + "a", "--payload", "{not json"],
        "--payload is not JSON",
    ),
    "unknown-app-module": (
        lambda _: ["pending", "--app", "tests.apps.no_such_module:app"],
        "cannot import 'tests.apps.no_such_module'",
    ),
    "unreachable-broker": (
        lambda port: [
            "submit",
            "--app",
            SAMPLE_APP,
            PREFIX + "a",
            "--broker",
            f"redis://127.0.0.1:{port}/0",
        ],
        "cannot reach the broker at redis://127.0.0.1:{port}/0",
    ),
    "unreachable-broker-status": (
        lambda port: ["status", "--broker", f"redis://127.0.0.1:{port}/0"],
        "cannot reach the broker at redis://127.0.0.1:{port}/0",
    ),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors_print_one_line_and_change_nothing(
    case: str, redis_url: str, redis_client: redis.Redis
) -> None:
    """Each bad input exits non-zero with exactly one stderr line starting with 'error:'
    that says what is wrong, no traceback anywhere, and nothing written to Redis."""
    port = free_port()  # nothing listens there
    make_args, expected = ERRORS[case]
    started = time.monotonic()
    done = cli(redis_url, *make_args(port))
    assert done.returncode != 0
    assert "Traceback" not in done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    assert expected.format(port=port) in lines[0]
    assert time.monotonic() - started < 15
    assert redis_client.keys("bgqueue:*") == []  # nothing submitted, no worker announced


# --- entry points --------------------------------------------------------------------


def test_help_and_installed_console_script() -> None:
    """`python -m bgqueue --help` and the installed `.venv/bin/bgqueue --help` both list
    every command and exit 0."""
    script = ROOT / ".venv" / "bin" / "bgqueue"
    assert script.is_file() and os.access(script, os.X_OK)
    for argv in ([sys.executable, "-m", "bgqueue", "--help"], [str(script), "--help"]):
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        listed = {
            line.split()[0]
            for line in done.stdout.split("Commands:")[1].splitlines()
            if line.strip()
        }
        assert listed == set(COMMANDS)


def test_celery_report_loads_the_documented_app_path() -> None:
    """`celery -A tests.apps.sample:app.celery report` loads the app's Celery app by the
    documented dotted path, without a broker, exits 0 and shows its config with the broker
    password masked."""
    port = free_port()  # nothing listens there: loading the app must not connect
    env = {**os.environ, "BGQUEUE_BROKER_URL": f"redis://:s3cret-pw@127.0.0.1:{port}/0"}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", f"{SAMPLE_APP}.celery", "report"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 10
    assert "Traceback" not in done.stdout + done.stderr
    assert f"broker_url: 'redis://:********@127.0.0.1:{port}/0'" in done.stdout
    assert "s3cret" not in done.stdout + done.stderr
    # The sample app's own Celery config, not a default app's.
    assert "worker_consumer: 'bgqueue.worker.intake:Consumer'" in done.stdout
    # A wrong attribute path fails: exit 0 above means the dotted path resolved.
    wrong = subprocess.run(
        [sys.executable, "-m", "celery", "-A", f"{SAMPLE_APP}.no_such_attr", "report"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert wrong.returncode != 0


def test_celery_command_runs_the_same_worker(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """`celery -A tests.apps.sample:app.celery worker` (the documented form) is a full
    bgqueue worker: it heartbeats under its Celery nodename, runs a dispatched request
    (recorded with that name) and leaves the worker list on SIGTERM."""
    nodename = f"celery@{socket.gethostname()}"
    cluster.beat()
    env = dict(cluster.env)
    env.pop("BGQUEUE_WORKER_NAME", None)
    env.pop("BGQUEUE_CONDITIONS", None)
    log_path = tmp_path / "celery-worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tests.apps.sample:app.celery",
                "worker",
                "--pool=prefork",
                "--concurrency=1",
                "--without-mingle",
                "--without-gossip",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(
            lambda: cluster.worker_alive(nodename) or worker.poll() is not None,
            30,
            "the celery worker's heartbeat",
        )
        assert worker.poll() is None, log_path.read_text()
        sample_app.scheduler.submit(
            bg.ProcessingTaskRequest(PREFIX + "process", payload={"complete": True})
        )
        record = wait_for(lambda: sample_app.scheduler.history(), 20, "the run's record")[0]
        assert (record.identifier, record.state, record.success) == (
            PREFIX + "process",
            "completed",
            True,
        )
        assert record.worker == nodename

        worker.send_signal(signal.SIGTERM)
        worker.wait(15)
        # A graceful stop announces leaving, so beat stops counting on it at once.
        assert redis_client.zscore(keys.AppKeys(APP_ID).alive, nodename) is None
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)
