"""Fixtures of the fault scenarios, and the table of their outcomes printed at the end of
the run (also written to .pytest_cache/d/bgqueue-faults/faults.jsonl)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faults import report
from tests.harness import Cluster


@pytest.fixture
def cluster(redis_url: str, tmp_path: Path) -> Iterator[Cluster]:
    """As tests/harness.py's, but SIGKILLs its processes at the end: a graceful Celery
    stop takes about 1.5 s per worker, and no fault scenario is about stopping."""
    manager = Cluster(redis_url, tmp_path)
    yield manager
    manager.kill_all()
    manager.stop_all()


@pytest.fixture
def fault_row(request: pytest.FixtureRequest) -> Callable[..., None]:
    """Record this scenario's row (see report.Row) and check it against DESIGN.md §6."""

    def row(
        scenario: str,
        *,
        accepted: int,
        lost: int,
        twice: int,
        allowed: int,
        recovery: float | None,
        note: str = "",
    ) -> None:
        chaos = request.node.get_closest_marker("chaos") is not None
        measured = report.Row(scenario, accepted, lost, twice, allowed, recovery, note)
        measured.test, measured.chaos = request.node.name, chaos
        report.record(measured)

    return row


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    rows = report.ROWS
    if not rows:
        return
    terminalreporter.section("fault injection: accepted, lost, run more than once, recovery")
    for line in report.table(rows):
        terminalreporter.write_line(line)
    cache = getattr(terminalreporter.config, "cache", None)
    if cache is not None:
        path = Path(cache.mkdir("bgqueue-faults")) / "faults.jsonl"
        report.write_jsonl(rows, path)
        terminalreporter.write_line(f"rows written to {path}")


# --- test hosts: network namespaces joined to this machine by veth pairs ---------------


@dataclass
class Host:
    """A test host: its namespace, its address, this machine's address on its link, and
    the link's end on this machine (set it down to cut the host off)."""

    namespace: str
    address: str
    gateway: str
    link: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def hosts() -> Iterator[list[Host]]:
    """Two test hosts, as in tests/test_hosts.py, on 10.232.<k>.0/24 links whose <k>
    depends on this pytest's pid, so two runs on one machine do not share a subnet."""
    tag = f"bgqf{os.getpid() % 100_000}"
    base = (os.getpid() % 100) * 2
    made: list[Host] = []
    try:
        for n in (1, 2):
            namespace, outside, inside = f"{tag}h{n}", f"{tag}a{n}", f"{tag}b{n}"
            net = f"10.232.{base + n}"
            _ip("netns", "add", namespace)
            made.append(Host(namespace, f"{net}.2", f"{net}.1", outside))
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", namespace)
            _ip("addr", "add", f"{net}.1/24", "dev", outside)
            _ip("link", "set", outside, "up")
            _ip("netns", "exec", namespace, "ip", "addr", "add", f"{net}.2/24", "dev", inside)
            _ip("netns", "exec", namespace, "ip", "link", "set", inside, "up")
            _ip("netns", "exec", namespace, "ip", "link", "set", "lo", "up")
        yield made
    finally:
        for host in made:
            subprocess.run(["ip", "link", "del", host.link], capture_output=True)
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
