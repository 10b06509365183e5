"""Horizontal scaling: several worker processes share one Redis and one beat; work spreads
over all of them and nothing runs twice. Throughput figures live in bench/scaling.py."""

from __future__ import annotations

from collections import Counter

import redis

import bgqueue as bg
from tests.harness import Cluster, run_everywhere

IDENTIFIERS = [f"com.bgqueue.test.{n}" for n in ("a", "b", "c", "process")]


def test_work_spreads_over_workers_and_runs_once(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """Four single-process workers: 120 requests over 30 scopes all complete, every worker
    runs some of them, and each request starts exactly once."""
    names = [f"w{i}" for i in range(4)]
    for name in names:
        cluster.worker(name, concurrency=1)
    cluster.beat()
    scopes = [f"s{i:02d}" for i in range(30)]
    starts = run_everywhere(sample_app, redis_client, scopes, IDENTIFIERS)
    per_request = Counter((e["scope"], e["id"]) for e in starts)
    assert set(per_request.values()) == {1}, per_request.most_common(3)
    per_worker = Counter(e["worker"] for e in starts)
    print(f"\nruns per worker: {dict(sorted(per_worker.items()))}")
    assert set(per_worker) == set(names), per_worker
