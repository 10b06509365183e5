"""`bgqueue demo`: the whole system on one machine, narrated.

Starts beat, two workers with different conditions (one also runs continuous tasks),
Flower behind a generated login, and an example app that keeps submitting a mix of
requests and uses the four parts of HarmonyOS's Background Tasks Kit: a transient suspend
delay, a continuous task, an efficiency resource and a repeating work. Prints a line per
event (deferred, routed, run, expired, completed; delays granted and the quota left;
the continuous task's states; grants and their expiry; work runs) until Ctrl-C, SIGTERM,
SIGHUP, an error, or the reader of its output going away (`bgqueue demo | head`, or a
`| tee` killed by the same Ctrl-C), and then, in every one of those cases, stops what it
started.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import bgqueue as bg
from bgqueue.broker import redact
from bgqueue.broker.embedded import data_dir, free_port
from bgqueue.model.requests import TaskRecord
from bgqueue.ops import status
from bgqueue.ops.loader import load_app

EXAMPLE = "workers/example_app.py"
WORKERS = {
    # name: conditions — one on mains power and wired network, one on battery over Wi-Fi.
    "mains-worker": ["external_power=true", "network=ethernet", "data_protection=complete"],
    "battery-worker": [
        "external_power=false",
        "network=wifi",
        "battery_level=40",
        "data_protection=none",
    ],
}
CONTINUOUS_WORKER = "mains-worker"  # started with --continuous
CONCURRENCY = {"mains-worker": "3", "battery-worker": "2"}  # mains also holds the download
SCOPES = ("default", "kiosk-7")
ROUND_SECONDS = 6
CPU_GRANT_MS = 30_000
DOWNLOAD = "download"
DOWNLOAD_SECONDS = 20  # the continuous task is stopped after running this long
SYNC_WORK = bg.WorkInfo(
    work_id=1,
    ability_name="sync",
    network_type=bg.NetworkType.ANY,
    is_charging=True,
    is_repeat=True,
    repeat_cycle_time=5_000,
    parameters={"what": "subscriptions"},
)


def example_path() -> Path:
    """The example app next to the package (editable install) or under the working dir."""
    beside = Path(bg.__file__).resolve().parents[1] / EXAMPLE
    return beside if beside.exists() else Path.cwd() / EXAMPLE


# Set once the demo's output has nowhere to go: the demo then winds down as if stopped.
OUTPUT_GONE = threading.Event()


def say(text: str) -> None:
    """One narrated line with a wall-clock stamp. Never raises: when the reader of the output
    has gone (a closed pipe), the output is dropped from then on and OUTPUT_GONE is set, so
    that the clean-up, which narrates too, still runs to its end."""
    try:
        print(f"[{datetime.now().strftime('%H:%M:%S')}] {text}", flush=True)
    except (BrokenPipeError, ValueError):  # ValueError: stdout was closed
        drop_output()


def drop_output() -> None:
    """Point stdout, and stderr if it went to the same place, at /dev/null: the line still
    buffered, and any later one, is then written nowhere instead of raising again, up to
    the interpreter's last flush at exit."""
    OUTPUT_GONE.set()
    with contextlib.suppress(OSError, ValueError):
        gone = os.fstat(sys.stdout.fileno())
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    if stream is sys.stdout or os.path.samestat(os.fstat(stream.fileno()), gone):
                        os.dup2(null, stream.fileno())
        finally:
            os.close(null)


def secs(ms: float) -> str:
    return f"{ms / 1000:.1f} s"


class Demo:
    """The demo's child processes, its producer loop and what it has narrated so far."""

    def __init__(self, broker_url: str, flower_port: int) -> None:
        self.broker_url = broker_url
        self.flower_port = flower_port if _port_free(flower_port) else free_port()
        self.logs = data_dir() / "demo-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.children: list[subprocess.Popen[bytes]] = []
        self.app_spec = f"{example_path()}:app"
        self.app = load_app(self.app_spec)
        self.app.use_broker(broker_url)
        self.seen: set[tuple[str, int, str]] = set()
        self.continuous: dict[str, str] = {}  # ability → state last narrated
        self.running_since: float | None = None  # monotonic, when the download was seen running
        self.progress_at = 0.0  # monotonic, when download progress was last narrated
        self.stopping = False  # the demo asked the download to stop
        self.work_runs: dict[int, int] = {}  # work id → runs narrated
        self.quota: dict[str, int] = {}  # scope → quota left last narrated (ms)
        self.delays: set[tuple[str, int]] = set()
        self.grants: set[tuple[str, bool]] = set()

    # -- processes ----------------------------------------------------------------------

    def spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        env = {**os.environ, "BGQUEUE_BROKER_URL": self.broker_url, **(env or {})}
        with open(self.logs / f"{name}.log", "ab") as log:
            child = subprocess.Popen(
                [sys.executable, "-m", "bgqueue", *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.children.append(child)

    def start(self) -> None:
        login = f"admin:{secrets.token_urlsafe(9)}"
        say(f"broker: {redact(self.broker_url)} (embedded Redis, AOF on)")
        self.spawn("beat", "beat")
        for name, conditions in WORKERS.items():
            flags = [arg for c in conditions for arg in ("--condition", c)]
            if name == CONTINUOUS_WORKER:
                flags.append("--continuous")
            args = ["worker", "--app", self.app_spec, "--name", name, *flags]
            self.spawn(name, *args, "--concurrency", CONCURRENCY[name])
            runs = " (also runs continuous tasks)" if name == CONTINUOUS_WORKER else ""
            say(f"worker {name}: {', '.join(conditions)}{runs}")
        # The login goes by environment, not argv, where `ps` would show it to anyone.
        self.spawn(
            "flower", "flower", "--port", str(self.flower_port), env={"FLOWER_BASIC_AUTH": login}
        )
        say(f"Flower: http://127.0.0.1:{self.flower_port}  login {login}")
        pending = f"http://127.0.0.1:{self.flower_port}/bgqueue/pending"
        say(f"pending requests: {pending} (Flower's Pending tab, same login)")
        say(f"process logs: {self.logs}")
        deadline = time.monotonic() + 30
        while len(self.app.live_workers()) < len(WORKERS) and time.monotonic() < deadline:
            time.sleep(0.2)
        say(f"{len(self.app.live_workers())} workers alive; submitting work (Ctrl-C to stop)")

    def stop(self) -> None:
        say("stopping")
        try:
            with contextlib.suppress(Exception):  # the broker may be what failed
                self.wind_down()
        finally:
            self.stop_children()
        say("stopped beat, workers and Flower")

    def stop_children(self) -> None:
        """SIGTERM each child's process group, then SIGKILL what is left after 10 s."""
        for child in self.children:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):  # it ended since the poll
                    os.killpg(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(max(0.1, deadline - time.monotonic()))
            # Whatever is left of its process group (a pool process, a hung main process).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()

    # -- the HarmonyOS parts ------------------------------------------------------------

    def clean_slate(self) -> None:
        """Remove what an earlier demo on this broker may have left: its download, works and
        grants (the embedded Redis keeps everything across runs)."""
        app = self.app
        if any(t.ability_name == DOWNLOAD for t in app.all_continuous_tasks()):
            say(f"continuous {DOWNLOAD}: left by an earlier demo; stopping it first")
            with contextlib.suppress(bg.ContinuousTaskVerificationFailed):  # already stopping
                app.stop_background_running(DOWNLOAD)
            # A task whose worker died while stopping is removed once beat sees its lease lapse.
            self.wait_gone(DOWNLOAD, 3 * app.settings.heartbeat_timeout)
        app.stop_and_clear_works()
        app.reset_all_efficiency_resources()

    def wait_gone(self, ability: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(t.ability_name != ability for t in self.app.all_continuous_tasks()):
                return True
            time.sleep(0.2)
        return False

    def start_harmony(self) -> None:
        """Apply CPU for 30 s, start the continuous download and the repeating sync work."""
        app = self.app
        self.skip_earlier_history()
        self.clean_slate()
        app.on("continuousTaskCancel", on_cancel)
        app.apply_efficiency_resources(
            bg.EfficiencyResourcesRequest(
                resource_types=bg.ResourceType.CPU,
                is_apply=True,
                time_out=CPU_GRANT_MS,
                reason="demo: the news app is busy",
            )
        )
        self.grants.add(("CPU", False))
        say(
            f"efficiency: CPU granted for {secs(CPU_GRANT_MS)} (system app): beat publishes the "
            "app's requests in the priority lane, and expiration handlers get the full warning"
        )
        app.start_background_running(DOWNLOAD, [bg.BackgroundMode.DATA_TRANSFER], {"files": 100})
        say(
            f"continuous {DOWNLOAD}: started (DATA_TRANSFER) for a --continuous worker; "
            f"the demo stops it after {DOWNLOAD_SECONDS} s of running"
        )
        app.start_work(SYNC_WORK)
        info = app.get_work_status(SYNC_WORK.work_id)
        say(
            f"work #{info.work_id} ({info.ability_name}) started: "
            f"{status.work_conditions(info)}; only mains-worker (on mains power) matches"
        )
        for scope in SCOPES:
            left = app.transient_task_info(scope).remaining_quota
            self.quota[scope] = left
        quota = app.limits.transient_daily_quota
        lefts = ", ".join(f"[{s}] {secs(q)}" for s, q in self.quota.items())
        say(f"transient: daily suspend-delay quota {quota:g} s per scope; left now {lefts}")

    def wind_down(self) -> None:
        """Stop the download and remove the work, so the next demo starts clean."""
        app = self.app
        app.off("continuousTaskCancel")
        if any(t.ability_name == DOWNLOAD for t in app.all_continuous_tasks()):
            with contextlib.suppress(bg.ContinuousTaskVerificationFailed):
                app.stop_background_running(DOWNLOAD)
                self.stopping = True
            self.wait_gone(DOWNLOAD, 5)
            self.report_continuous()
        app.stop_and_clear_works()
        say(f"work #{SYNC_WORK.work_id} ({SYNC_WORK.ability_name}): stopped and removed")

    # -- the producer -------------------------------------------------------------------

    def submit_round(self, round_no: int) -> None:
        now = datetime.now(UTC)
        scope = SCOPES[round_no % len(SCOPES)]
        scheduler = self.app.scheduler_for(scope)
        news = "com.example.news"
        requests: list[tuple[bg.BGTaskRequest, str]] = [
            (
                bg.AppRefreshTaskRequest(f"{news}.refresh", requires_network_connectivity=True),
                "refresh, needs network: runs as soon as a worker is free",
            ),
            (
                bg.ProcessingTaskRequest(
                    f"{news}.cleanup",
                    earliest_begin_date=now + timedelta(seconds=4),
                    requires_external_power=True,
                    payload={"seconds": 1.5},
                ),
                "cleanup, needs power, not before +4 s: deferred, then routed to mains-worker",
            ),
        ]
        # Export and digest take turns so that each scope gets both: export, digest, digest,
        # export, ... while the scope alternates default, kiosk-7, ...
        if round_no % 4 in (0, 3):
            requests.append(
                (
                    bg.ProcessingTaskRequest(f"{news}.export.pdf"),
                    "export overruns its 8 s budget: it will be expired",
                )
            )
        else:
            requests.append(
                (
                    bg.ProcessingTaskRequest(f"{news}.digest"),
                    "digest needs 10 s of its 8 s budget: it will ask for a transient delay",
                )
            )
        if round_no % 3 == 0:
            requests.append(
                (
                    bg.HealthResearchTaskRequest(f"{news}.study"),
                    "health study, needs complete data protection: mains-worker only",
                )
            )
            requests.append(
                (
                    bg.ContinuedProcessingTaskRequest(
                        f"{news}.upload",
                        title="Uploading",
                        strategy=bg.ContinuedProcessingStrategy.QUEUE,
                    ),
                    "upload (continued processing), reports progress",
                )
            )
        for request, story in requests:
            try:
                scheduler.submit(request)
                say(f"submit [{scope}] {story}")
            except bg.TooManyPendingTaskRequests as exc:
                say(f"refused [{scope}] {request.identifier}: {exc.message}")

    # -- narration ----------------------------------------------------------------------

    def report(self) -> None:
        """Narrate what changed since the last call: one line per event."""
        self.report_history()
        self.report_transient()
        self.report_continuous()
        self.report_efficiency()
        self.report_works()

    def skip_earlier_history(self) -> None:
        """Runs an earlier demo on this broker recorded are history: not narrated again."""
        earlier = 0
        for scope in SCOPES:
            for record in self.app.scheduler_for(scope).history(limit=50):
                self.seen.add((scope, record.request_id, record.state))
                earlier += 1
        if earlier:
            say(f"history: {earlier} runs of earlier demos are recorded (not repeated here)")

    def report_history(self) -> None:
        for scope in SCOPES:
            for record in reversed(self.app.scheduler_for(scope).history(limit=50)):
                key = (scope, record.request_id, record.state)
                if key in self.seen:
                    continue
                self.seen.add(key)
                say(f"  {describe(record)}")

    def report_transient(self) -> None:
        """New suspend delays, and the scope's quota left whenever it changes."""
        for scope in SCOPES:
            info = self.app.transient_task_info(scope)
            fresh = [d for d in info.transient_tasks if (scope, d.request_id) not in self.delays]
            for delay in fresh:
                self.delays.add((scope, delay.request_id))
                say(
                    f"transient: [{scope}] suspend delay #{delay.request_id} granted "
                    f'({secs(delay.actual_delay_time)} left, "{self.delay_reason(scope, delay)}"): '
                    f"its task may run past its budget; quota left "
                    f"{secs(info.remaining_quota)} (the extension is reserved until it ends)"
                )
            before = self.quota.get(scope)
            if not fresh and before is not None and info.remaining_quota != before:
                say(
                    f"transient: [{scope}] delays settled: quota left "
                    f"{secs(info.remaining_quota)} (only the time past the budget is charged)"
                )
            self.quota[scope] = info.remaining_quota

    def delay_reason(self, scope: str, delay: bg.DelaySuspendInfo) -> str:
        """The reason the task gave for a delay (kept with it in Redis)."""
        raw = self.app.client.hget(self.app.keys.transient_delays(scope), delay.request_id)
        return str(json.loads(raw).get("r", "")) if raw else ""

    def report_continuous(self) -> None:
        """State changes of the continuous tasks, their progress every 5 s, and the stop."""
        tasks = {t.ability_name: t for t in self.app.all_continuous_tasks()}
        for ability in [a for a in self.continuous if a not in tasks]:
            del self.continuous[ability]
            how = "its handler returned" if self.stopping else "ended"
            say(f"continuous {ability}: stopped ({how}); the task is gone")
        for ability, task in tasks.items():
            if self.continuous.get(ability) != task.state:
                self.continuous[ability] = task.state
                say(f"continuous {ability}: {continuous_state(task)}")
            if task.state == "running":
                self.watch_download(task)

    def watch_download(self, task: bg.ContinuousTaskInfo) -> None:
        now = time.monotonic()
        if self.running_since is None:
            self.running_since = now
        if task.progress and now - self.progress_at >= 5:
            self.progress_at = now
            done, total = task.progress
            say(f"continuous {task.ability_name}: {done}/{total} files downloaded")
        if not self.stopping and now - self.running_since >= DOWNLOAD_SECONDS:
            self.stopping = True
            say(
                f"continuous {task.ability_name}: stop_background_running after "
                f"{DOWNLOAD_SECONDS} s of running"
            )
            self.app.stop_background_running(task.ability_name)

    def report_efficiency(self) -> None:
        """Grants that appeared or ended since the last look (timed ones end by expiring)."""
        held = {
            (str(g.resource_types.name), g.is_for_process): g
            for g in self.app.all_efficiency_resources()
        }
        for name, process in sorted(self.grants - held.keys()):
            level = "process" if process else "app"
            say(f"efficiency: {name} grant ({level} level) expired: Redis dropped it at its end")
        for (name, process), grant in sorted(held.items()):
            if (name, process) not in self.grants:
                level = "process" if process else "app"
                say(f'efficiency: {name} granted ({level} level, "{grant.reason}")')
        self.grants = set(held)

    def report_works(self) -> None:
        """A line per finished work run, from the work's last run and is_last_work_time_out."""
        app = self.app
        for work in status.read_works(app.client, app.scripts, app.keys):
            info: bg.WorkInfo = work["info"]
            last = work["last"]
            if not last or self.work_runs.get(info.work_id) == last.get("n"):
                continue
            self.work_runs[info.work_id] = last.get("n")
            timed_out = app.is_last_work_time_out(info.work_id)
            now_ms = app.client.time()
            now = now_ms[0] * 1000 + now_ms[1] // 1000
            say(
                f"work #{info.work_id} ({info.ability_name}) {status.last_run(last)} "
                f"(is_last_work_time_out: {timed_out}); {status.work_state(work, now)}"
            )


def on_cancel(info: bg.ContinuousTaskCancelInfo) -> None:
    """The app's continuousTaskCancel callback: the system cancelled a continuous task."""
    why = f": {info.message}" if info.message else ""
    say(f"continuous {info.ability_name}: CANCELLED by the system, {info.reason.name}{why}")


def continuous_state(task: bg.ContinuousTaskInfo) -> str:
    """A continuous task's state, for people."""
    modes = ",".join(m.name for m in task.background_modes)
    return {
        "pending": "pending, waiting for a --continuous worker",
        "dispatched": "dispatched to a --continuous worker",
        "running": f"running on {task.worker} ({modes}), restarts {task.restarts}",
        "stopping": "stopping: its handler was told to return",
    }.get(task.state, task.state)


def describe(record: TaskRecord) -> str:
    """One line about a finished run."""
    took = ""
    if record.started_at and record.finished_at:
        took = f" after {(record.finished_at - record.started_at).total_seconds():.1f}s"
    outcome = {
        ("completed", True): "completed ✓",
        ("completed", False): "completed, unsuccessful",
        ("expired", False): "EXPIRED (terminated at its deadline)",
        ("failed", False): "failed",
        ("cancelled", False): "cancelled",
    }.get((record.state, record.success), record.state)
    where = f" on {record.worker}" if record.worker else ""
    why = f" — {record.reason}" if record.reason else ""
    return f"[{record.scope}] {record.identifier} ({record.kind}) {outcome}{where}{took}{why}"


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _interrupt(signum: int, frame: FrameType | None) -> Any:
    raise KeyboardInterrupt


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def run_demo(broker_url: str, flower_port: int) -> None:
    """Run the demo until Ctrl-C, SIGTERM, SIGHUP (its terminal closed), an error, or its
    output's reader going away; each of them stops the processes it started."""
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, _interrupt)
    # A closed pipe is then a BrokenPipeError that say() handles, not a death by SIGPIPE
    # that would leave the children running (Python ignores SIGPIPE, unless its caller
    # restored the default).
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    demo = Demo(broker_url, flower_port)
    try:
        demo.start()
        demo.start_harmony()
        round_no = 0
        next_round = time.monotonic()
        while not OUTPUT_GONE.is_set():
            if time.monotonic() >= next_round:
                demo.submit_round(round_no)
                round_no += 1
                next_round = time.monotonic() + ROUND_SECONDS
            demo.report()
            time.sleep(0.3)
    except KeyboardInterrupt:
        pass
    finally:
        # A second Ctrl-C or signal must not cut the clean-up short and leave workers behind.
        for stop_signal in STOP_SIGNALS:
            signal.signal(stop_signal, signal.SIG_IGN)
        demo.stop()
