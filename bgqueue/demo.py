"""`bgqueue demo`: the whole system on one machine, narrated.

Starts beat, two workers with different conditions, Flower behind a generated
login, and an example app that keeps submitting a mix of requests; prints what
happens to each (deferred, routed, run, expired, completed) until Ctrl-C.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import bgqueue as bg
from bgqueue.broker import redact
from bgqueue.embedded import data_dir, free_port
from bgqueue.loader import load_app
from bgqueue.requests import TaskRecord

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
SCOPES = ("default", "kiosk-7")


def example_path() -> Path:
    """The example app next to the package (editable install) or under the working dir."""
    beside = Path(bg.__file__).resolve().parents[1] / EXAMPLE
    return beside if beside.exists() else Path.cwd() / EXAMPLE


def say(text: str) -> None:
    """One narrated line with a wall-clock stamp."""
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {text}", flush=True)


class Demo:
    """The demo's child processes and its producer loop."""

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

    def spawn(self, name: str, *args: str) -> None:
        env = {**os.environ, "BGQUEUE_BROKER_URL": self.broker_url}
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
            self.spawn(
                name, "worker", "--app", self.app_spec, "--name", name, "--concurrency", "2", *flags
            )
            say(f"worker {name}: {', '.join(conditions)}")
        self.spawn("flower", "flower", "--port", str(self.flower_port), "--basic-auth", login)
        say(f"Flower: http://127.0.0.1:{self.flower_port}  login {login}")
        say(f"process logs: {self.logs}")
        deadline = time.monotonic() + 30
        while len(self.app.live_workers()) < len(WORKERS) and time.monotonic() < deadline:
            time.sleep(0.2)
        say(f"{len(self.app.live_workers())} workers alive; submitting work (Ctrl-C to stop)")

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
        if round_no % 2 == 0:
            requests.append(
                (
                    bg.ProcessingTaskRequest(f"{news}.export.pdf"),
                    "export overruns its 8 s budget: it will be expired",
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

    def report(self) -> None:
        for scope in SCOPES:
            for record in reversed(self.app.scheduler_for(scope).history(limit=50)):
                key = (scope, record.request_id, record.state)
                if key in self.seen:
                    continue
                self.seen.add(key)
                say(f"  {describe(record)}")

    def stop(self) -> None:
        say("stopping")
        for child in self.children:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
        for child in self.children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)


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


def run_demo(broker_url: str, flower_port: int) -> None:
    """Run the demo until Ctrl-C."""
    demo = Demo(broker_url, flower_port)
    demo.start()
    round_no = 0
    next_round = time.monotonic()
    try:
        while True:
            if time.monotonic() >= next_round:
                demo.submit_round(round_no)
                round_no += 1
                next_round = time.monotonic() + 6
            demo.report()
            time.sleep(0.3)
    except KeyboardInterrupt:
        pass
    finally:
        demo.stop()
