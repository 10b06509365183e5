"""`bgqueue demo` stops everything it started however it is stopped: Ctrl-C after the reader
of its output went away (`make demo 2>&1 | tee demo.log`, then Ctrl-C, which kills tee
too), the reader going away alone (`bgqueue demo | head`), SIGTERM and SIGHUP.

Each case runs the real demo (beat, two workers, Flower) on the test broker with the short
intervals of tests.harness.FAST, waits until it has started everything, stops it the way
the case says, and checks that every process it started, pool processes included, is gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import psutil
import pytest

from bgqueue.broker.embedded import free_port
from tests.harness import FAST, wait_for

ROOT = Path(__file__).resolve().parents[1]
STARTED = "workers alive; submitting work"  # the demo's line once everything runs


class RunningDemo:
    """`bgqueue demo` in its own session (as a terminal's foreground job is its own process
    group), its output going to `out`: a file, or a pipe to a reader process."""

    def __init__(self, redis_url: str, tmp_path: Path, piped: bool) -> None:
        self.log = tmp_path / "demo.out"
        env = {**os.environ, **FAST, "BGQUEUE_HOME": str(tmp_path / "home")}
        env.pop("PYTEST_CURRENT_TEST", None)
        argv = [sys.executable, "-m", "bgqueue", "demo", "--broker", redis_url]
        argv += ["--flower-port", str(free_port())]
        self.reader: subprocess.Popen[bytes] | None = None
        with open(self.log, "wb") as log:
            out: int | IO[bytes] = subprocess.PIPE if piped else log
            self.popen = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            if piped:
                assert self.popen.stdout is not None
                # `tee`'s part: read the pipe and keep what it read.
                self.reader = subprocess.Popen(["cat"], stdin=self.popen.stdout, stdout=log)
                # Only the reader may hold the pipe's read end, or it would not close with it.
                self.popen.stdout.close()
        self.process = psutil.Process(self.popen.pid)
        self.started: list[psutil.Process] = []

    def wait_started(self) -> list[psutil.Process]:
        """Wait for the demo's line saying it runs; return every process it started."""
        wait_for(
            lambda: (
                STARTED in self.log.read_text(errors="replace") or self.popen.poll() is not None
            ),
            60,
            "the demo to start beat, workers and Flower",
        )
        assert self.popen.poll() is None, self.log.read_text(errors="replace")
        self.started = self.process.children(recursive=True)  # the workers' pools too
        commands = [" ".join(p.cmdline()) for p in self.process.children()]
        roles = {role for role in ("beat", "worker", "flower") for c in commands if f" {role}" in c}
        assert roles == {"beat", "worker", "flower"}, commands
        assert sum(" worker --app " in c for c in commands) == 2, commands
        return self.started

    def left(self) -> list[psutil.Process]:
        """The demo and the processes it started that are still running (not zombies)."""
        found = []
        for proc in [self.process, *self.started]:
            with contextlib.suppress(psutil.NoSuchProcess):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        return found

    def kill_all(self) -> None:
        """Whatever a failed test left: SIGKILL by pid, the reader and the demo reaped."""
        for proc in self.started:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()  # psutil checks it is still the process it was (pid reuse)
        for popen in (self.reader, self.popen):
            if popen is not None:
                if popen.poll() is None:
                    popen.kill()
                popen.wait(10)


@pytest.fixture
def start_demo(redis_url: str, tmp_path: Path) -> Iterator[Callable[[bool], RunningDemo]]:
    """Starts the demo on the test broker (piped or not); kills what is left at the end."""
    made: list[RunningDemo] = []

    def start(piped: bool) -> RunningDemo:
        made.append(RunningDemo(redis_url, tmp_path, piped))
        return made[-1]

    yield start
    for demo in made:
        demo.kill_all()


def assert_all_gone(demo: RunningDemo) -> None:
    try:
        wait_for(lambda: not demo.left(), 30, "the demo and every process it started to end")
    except AssertionError:
        left = [" ".join(p.cmdline()) for p in demo.left()]
        raise AssertionError(f"still running 30 s later: {left}") from None
    # Reaped by the demo (it waits for its children), the demo by us: it exited cleanly.
    assert demo.popen.wait(5) == 0


@pytest.mark.parametrize("then_sigint", [True, False], ids=["then-ctrl-c", "reader-only"])
def test_demo_stops_its_processes_when_the_reader_of_its_output_goes_away(
    start_demo: Callable[[bool], RunningDemo], then_sigint: bool
) -> None:
    demo = start_demo(True)
    demo.wait_started()
    assert demo.reader is not None
    demo.reader.kill()  # the pipe closes: the demo's next line cannot be written
    demo.reader.wait(10)
    if then_sigint:
        os.killpg(demo.popen.pid, signal.SIGINT)  # Ctrl-C, to the foreground process group
    assert_all_gone(demo)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_demo_stops_its_processes_on_sigterm_and_sighup(
    start_demo: Callable[[bool], RunningDemo], stop_signal: signal.Signals
) -> None:
    demo = start_demo(False)
    demo.wait_started()
    if stop_signal == signal.SIGHUP:
        os.killpg(demo.popen.pid, stop_signal)  # the terminal closed: its whole job
    else:
        demo.popen.send_signal(stop_signal)  # `kill PID`, or a supervisor stopping it
    assert_all_gone(demo)
    text = demo.log.read_text()
    assert "Traceback" not in text
    assert text.splitlines()[-1].endswith("] stopped beat, workers and Flower"), text
