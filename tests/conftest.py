"""Shared fixtures: real Redis servers started per session or per test, never fakes.

Every test runs with BGQUEUE_HOME in a session temporary directory, so the embedded
Redis it may start is not the user's, and is shut down when the session ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from bgqueue.broker import ENV_BROKER_URL, connect
from bgqueue.broker.embedded import RedisServer, stop_embedded_redis

# --- isolation from the user's environment -------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def bgqueue_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private BGQUEUE_HOME for the session; its embedded Redis is stopped at the end."""
    home = tmp_path_factory.mktemp("bgqueue-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BGQUEUE_HOME", str(home))
        # A broker URL from the developer's shell would send tests to a real deployment.
        patch.delenv(ENV_BROKER_URL, raising=False)
        yield home
        stop_embedded_redis()


# --- dedicated Redis servers ---------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One dedicated Redis (AOF on, free port) shared by the session; do not stop it."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL, emptied with FLUSHALL so each test starts clean."""
    client = redis_server.client()
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A bgqueue client (bgqueue.broker.connect) to the emptied session server."""
    client = connect(redis_url)
    yield client
    client.close()


@pytest.fixture
def make_redis_server(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """A factory of started servers for this test alone (password, kill, restart...).

    Call it with RedisServer's keyword arguments, e.g. `make_redis_server(password="pw")`;
    every server it made is stopped when the test ends.
    """
    servers: list[RedisServer] = []

    def make(**options: Any) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}", **options)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()


from tests.harness import cluster, sample_app  # noqa: E402,F401  (process fixtures)
