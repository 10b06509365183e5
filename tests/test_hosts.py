"""Workers on separate network hosts: network namespaces made by this test, each joined to
this machine by its own veth pair, each running a worker that reaches Redis over its link.

Only addresses of these test hosts and loopback are used (10.231.<n>.0/24 lives inside the
namespaces the test creates and removes)."""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from bgqueue.broker.embedded import RedisServer
from tests.apps import sample
from tests.harness import Cluster, run_everywhere

PASSWORD = "hosts-test-pw"
IDENTIFIERS = [f"com.bgqueue.test.{n}" for n in ("a", "b", "c", "process")]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def hosts() -> Iterator[list[tuple[str, str, str]]]:
    """Two test hosts: (namespace, the host's own address, this machine's address on its link)."""
    tag = f"bgq{os.getpid() % 100_000}"
    made: list[tuple[str, str]] = []
    try:
        for n in (1, 2):
            namespace, outside, inside = f"{tag}h{n}", f"{tag}a{n}", f"{tag}b{n}"
            ip("netns", "add", namespace)
            made.append((namespace, outside))
            ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            ip("link", "set", inside, "netns", namespace)
            ip("addr", "add", f"10.231.{n}.1/24", "dev", outside)
            ip("link", "set", outside, "up")
            ip("netns", "exec", namespace, "ip", "addr", "add", f"10.231.{n}.2/24", "dev", inside)
            ip("netns", "exec", namespace, "ip", "link", "set", inside, "up")
            ip("netns", "exec", namespace, "ip", "link", "set", "lo", "up")
        yield [(ns, f"10.231.{n}.2", f"10.231.{n}.1") for n, (ns, _) in enumerate(made, 1)]
    finally:
        for namespace, outside in made:
            subprocess.run(["ip", "link", "del", outside], capture_output=True)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def test_workers_on_separate_hosts_share_the_work_and_run_it_once(
    hosts: list[tuple[str, str, str]],
    make_redis_server: Callable[..., RedisServer],
    tmp_path: Path,
) -> None:
    """A worker on each of two network hosts, beat and the producer on this machine: 80
    requests all complete, both hosts run some, each request starts exactly once, and Redis
    sees each worker connect from its own host's address."""
    server = make_redis_server(password=PASSWORD, extra_bind=tuple(h[2] for h in hosts))
    cluster = Cluster(server.url, tmp_path)
    client = redis.Redis.from_url(server.url)
    try:
        for n, (namespace, _, gateway) in enumerate(hosts, 1):
            url = f"redis://:{PASSWORD}@{gateway}:{server.port}/0"
            cluster.worker(
                f"host{n}", concurrency=2, netns=namespace, env={"BGQUEUE_BROKER_URL": url}
            )
        cluster.beat()
        sample.app._client = None
        sample.app._announced = False
        sample.app.use_broker(server.url)
        scopes = [f"s{i:02d}" for i in range(20)]
        starts = run_everywhere(sample.app, client, scopes, IDENTIFIERS)
        assert set(Counter((e["scope"], e["id"]) for e in starts).values()) == {1}
        per_host = Counter(e["worker"] for e in starts)
        print(f"\nruns per host: {dict(sorted(per_host.items()))}")
        assert set(per_host) == {"host1", "host2"}
        peers = {c["addr"].rsplit(":", 1)[0] for c in client.client_list()}
        assert {h[1] for h in hosts} <= peers, peers
    finally:
        cluster.kill_all()
        cluster.stop_all()
        client.close()
        sample.app._client = None
