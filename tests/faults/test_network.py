"""A network partition: one worker host cut off from Redis (its link set down) while it
runs tasks, then healed. The hosts are network namespaces made by the test (see the
`hosts` fixture); only their addresses and loopback are used."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from bgqueue.broker.embedded import RedisServer
from tests.faults.conftest import Host, _ip
from tests.faults.probes import (
    HANDLED,
    HEARTBEAT_TIMEOUT,
    SLOW,
    await_completion,
    processing,
    producer,
    ran_twice,
    stuck,
)
from tests.harness import Cluster, events, wait_for

Row = Callable[..., None]
PASSWORD = "faults-partition-pw"


def starts_on(client: redis.Redis, worker: str) -> list[dict[str, Any]]:
    return [e for e in events(client, "start") if e["worker"] == worker]


@pytest.mark.chaos
def test_worker_host_partitioned_mid_task_then_healed(
    hosts: list[Host],
    make_redis_server: Callable[..., RedisServer],
    tmp_path: Path,
    fault_row: Row,
) -> None:
    """A worker on each of two hosts; host1 runs two requests when its link goes down.
    Its heartbeat and run leases lapse, so both requests run again on host2 (at-least-once,
    counted), and requests submitted during the partition run on host2. When the link is
    back, host1 beats again; its cut-off runs do not complete a second time unnoticed (they
    are stopped, or their completion is refused as already given up), and nothing is lost."""
    server = make_redis_server(password=PASSWORD, extra_bind=tuple(h.gateway for h in hosts))
    cluster = Cluster(server.url, tmp_path)
    client = redis.Redis.from_url(server.url)
    env = {"TEST_PROCESSING_BUDGET": "20"}
    cut, other = hosts
    try:

        def url(host: Host) -> str:
            return f"redis://:{PASSWORD}@{host.gateway}:{server.port}/0"

        partitioned = cluster.worker(
            "host1", concurrency=2, netns=cut.namespace, env={**env, "BGQUEUE_BROKER_URL": url(cut)}
        )
        cluster.beat()
        app = producer(server.url)
        held = {("default", SLOW), ("default", HANDLED[0])}
        app.scheduler.submit_many(processing(i, {"sleep": 8, "complete": True}) for _, i in held)
        wait_for(lambda: len(starts_on(client, "host1")) == 2, 20, "both to start on host1")
        cluster.worker(
            "host2",
            concurrency=2,
            netns=other.namespace,
            env={**env, "BGQUEUE_BROKER_URL": url(other)},
        )

        _ip("link", "set", cut.link, "down")
        cut_at = time.monotonic()
        try:
            during = {("during", i) for i in HANDLED[1:5]}
            app.scheduler_for("during").submit_many(
                processing(i, {"complete": True}) for _, i in during
            )
            wait_for(
                lambda: {e["id"] for e in starts_on(client, "host2")} >= {i for _, i in held},
                HEARTBEAT_TIMEOUT + 8,
                "host1's requests to run again on host2",
            )
            recovery = time.monotonic() - cut_at
            # Its heartbeat lapses too (up to a heartbeat interval apart from its runs').
            wait_for(lambda: not cluster.worker_alive("host1"), 2, "host1's heartbeat to lapse")
        finally:
            _ip("link", "set", cut.link, "up")
        wait_for(lambda: cluster.worker_alive("host1"), 20, "host1 to beat again after healing")
        # Its runs learn they were given up: stopped, or (if they ended first) not recorded.
        wait_for(lambda: partitioned.log().count("given up as lost") >= 2, 15, "host1 to let go")

        accepted = held | during
        lost, _ = await_completion(app, accepted, 20)
        twice = ran_twice(client)
        fault_row(
            "worker host partitioned mid-task (ip link down), healed",
            accepted=len(accepted),
            lost=len(lost),
            twice=len(twice),
            allowed=len(held),
            recovery=recovery,
            note="cut -> host1's requests rerun on host2",
        )
        assert not lost, stuck(client)
        # What host1 was running when cut off is recorded once as lost, once completed.
        for _, identifier in held:
            runs = sorted(
                (r.worker, r.state) for r in app.scheduler.history() if r.identifier == identifier
            )
            assert runs == [("host1", "failed"), ("host2", "completed")], runs
    finally:
        cluster.kill_all()
        cluster.stop_all()
        client.close()
