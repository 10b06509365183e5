"""Broker URL resolution, the embedded Redis and connecting, against real redis-servers."""

from __future__ import annotations

import asyncio
import re
import shutil
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import pytest
import redis

import bgqueue as bg
from bgqueue.broker import connect, deadletter, redact, resolve_broker_url, ssl_options
from bgqueue.broker.embedded import (
    HOST,
    RedisServer,
    ensure_embedded_redis,
    free_port,
    redis_server_binary,
    stop_embedded_redis,
)
from bgqueue.errors import ParameterError, ServiceError

ROOT = Path(__file__).resolve().parents[1]
ENSURE_IN_SUBPROCESS = "from bgqueue.broker.embedded import ensure_embedded_redis as e; print(e())"


def run_python(code: str) -> str:
    """Run `code` in a fresh interpreter (same environment) and return its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def run_id(url: str) -> str:
    client = connect(url)
    try:
        return str(cast(dict[str, Any], client.info("server"))["run_id"])
    finally:
        client.close()


def server_config(url: str) -> dict[str, str]:
    client = connect(url)
    try:
        return cast(dict[str, str], client.config_get("*"))
    finally:
        client.close()


@pytest.fixture
def fresh_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A BGQUEUE_HOME of this test alone, with no embedded server yet; stopped afterwards."""
    monkeypatch.setenv("BGQUEUE_HOME", str(tmp_path / "home"))
    yield tmp_path / "home"
    stop_embedded_redis()


# --- resolution order ------------------------------------------------------------------


def test_argument_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BGQUEUE_BROKER_URL", "redis://127.0.0.1:1111/2")
    assert resolve_broker_url("redis://127.0.0.1:2222/3") == "redis://127.0.0.1:2222/3"


def test_environment_wins_over_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BGQUEUE_BROKER_URL", "redis://127.0.0.1:1111/2")
    assert resolve_broker_url(None) == "redis://127.0.0.1:1111/2"


def test_no_argument_and_no_environment_means_embedded() -> None:
    url = resolve_broker_url(None)
    assert re.fullmatch(r"redis://:[\w-]{32}@127\.0\.0\.1:\d+/0", url)
    assert url == ensure_embedded_redis()
    assert connect(url).ping()


def test_embedded_server_admits_only_its_users_processes(fresh_home: Path) -> None:
    """The embedded server requires a password generated at its first start, kept in a file
    only this user can read in a directory only this user can enter: another local user
    can neither read nor write its state. (Before, anyone on the host could connect.)"""
    url = ensure_embedded_redis()
    directory = fresh_home / "redis"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    password_file = directory / "password"
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert password_file.read_text().strip() in url
    port = int(url.rpartition(":")[2].split("/")[0])
    stranger = redis.Redis(host=HOST, port=port, socket_timeout=2)
    with pytest.raises(redis.AuthenticationError):
        stranger.get("anything")
    stranger.close()
    assert "password" not in redact(url) and "***" in redact(url)


def test_an_open_embedded_server_from_before_passwords_is_closed(fresh_home: Path) -> None:
    """A server an older version started without a password (found on the recorded port)
    is given the password at once and reused, data and all."""
    directory = fresh_home / "redis"
    server = RedisServer(directory)
    server.start()
    try:
        (directory / "port").write_text(f"{server.port}\n")
        server.client().set("accepted", "1")
        url = ensure_embedded_redis()
        assert f":{server.port}/" in url and connect(url).get("accepted") == b"1"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=HOST, port=server.port, socket_timeout=2).get("accepted")
    finally:
        stop_embedded_redis()
        server.kill()


# --- the embedded server ---------------------------------------------------------------


def test_embedded_server_is_durable_and_loopback_only() -> None:
    config = server_config(ensure_embedded_redis())
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == "everysec"
    assert config["bind"] == HOST
    assert config["protected-mode"] == "yes"
    assert config["maxmemory-policy"] == "noeviction"


def test_embedded_server_is_reused_in_process_and_by_other_processes() -> None:
    first = ensure_embedded_redis()
    assert ensure_embedded_redis() == first
    before = run_id(first)
    assert run_python(ENSURE_IN_SUBPROCESS) == first
    assert run_id(first) == before  # the same server, not a new one on the same port


def test_embedded_server_outlives_the_process_that_started_it(fresh_home: Path) -> None:
    started = run_python(
        "from bgqueue.broker.embedded import ensure_embedded_redis as e; import redis\n"
        "url = e(); redis.Redis.from_url(url).set('written-by', 'starter'); print(url)"
    )
    assert ensure_embedded_redis() == started
    assert connect(started).get("written-by") == b"starter"


def test_concurrent_first_starts_share_one_server(fresh_home: Path) -> None:
    with ThreadPoolExecutor(4) as pool:
        urls = set(pool.map(run_python, [ENSURE_IN_SUBPROCESS] * 4))
    assert len(urls) == 1
    assert urls == {ensure_embedded_redis()}


def test_embedded_data_survives_a_server_restart(fresh_home: Path) -> None:
    url = ensure_embedded_redis()
    connect(url).set("accepted", "1")
    assert stop_embedded_redis()
    assert ensure_embedded_redis() == url  # same port: URLs held by workers stay valid
    assert connect(url).get("accepted") == b"1"  # replayed from the AOF


def test_port_file_naming_another_redis_is_not_trusted(
    fresh_home: Path, redis_server: RedisServer
) -> None:
    # The recorded port now belongs to a different Redis (here, the session's).
    (fresh_home / "redis").mkdir(parents=True)
    (fresh_home / "redis" / "port").write_text(f"{redis_server.port}\n")
    url = ensure_embedded_redis()
    assert url != redis_server.url
    assert server_config(url)["dir"] == str((fresh_home / "redis").resolve())


def test_server_binary_is_found() -> None:
    version = subprocess.run(
        [redis_server_binary(), "--version"], capture_output=True, text=True, timeout=10
    )
    assert version.stdout.startswith("Redis server v=")


# --- dedicated servers: restart and kill keep AOF data -----------------------------------


def test_dedicated_server_replays_its_aof_after_kill(
    make_redis_server: Callable[..., RedisServer],
) -> None:
    server = make_redis_server(appendfsync="always")
    port = server.port
    connect(server.url).set("k", "v")
    server.kill()
    assert not server.running
    server.start()
    assert server.port == port
    assert connect(server.url).get("k") == b"v"


# --- passwords, unreachable brokers, unix sockets ----------------------------------------


def test_password_protected_server(make_redis_server: Callable[..., RedisServer]) -> None:
    server = make_redis_server(password="s3cret-pw")
    assert connect(f"redis://:s3cret-pw@{HOST}:{server.port}/0").ping()
    assert connect(f"redis://default:s3cret-pw@{HOST}:{server.port}/1").ping()
    for url in (f"redis://:wrong-pw-42@{HOST}:{server.port}/0", f"redis://{HOST}:{server.port}/0"):
        with pytest.raises(ServiceError) as caught:
            connect(url)
        assert f"{HOST}:{server.port}" in str(caught.value)
        assert "wrong-pw-42" not in str(caught.value)
        assert "s3cret-pw" not in str(caught.value)


def test_unreachable_broker_fails_fast_without_showing_the_password() -> None:
    port = free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(ServiceError) as caught:
        connect(f"redis://:secret@{HOST}:{port}/0")
    assert time.monotonic() - started < 5
    error = caught.value
    assert error.code == 9800004
    assert f"{HOST}:{port}" in str(error)
    assert "BGQUEUE_BROKER_URL" in str(error)
    assert "secret" not in str(error) and "secret" not in str(error.__cause__)


def test_malformed_url_is_a_parameter_error_without_the_password() -> None:
    with pytest.raises(ParameterError) as caught:
        connect("http://:hunter2@127.0.0.1:6379/0")
    assert "hunter2" not in str(caught.value)


def test_unix_socket_url(make_redis_server: Callable[..., RedisServer]) -> None:
    server = make_redis_server(unix_socket=True)
    client = connect(f"unix://{server.socket_path}?db=3")
    client.set("over", "socket")
    assert connect(f"redis://{HOST}:{server.port}/3").get("over") == b"socket"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://alice:p%40ss@127.0.0.1:6380/2", "redis://alice:***@127.0.0.1:6380/2"),
        ("redis://alice@127.0.0.1:6379", "redis://alice@127.0.0.1:6379"),
        (
            "rediss://:pw@127.0.0.1:6380/0?ssl_cert_reqs=none",
            "rediss://:***@127.0.0.1:6380/0?ssl_cert_reqs=none",
        ),
        ("redis://127.0.0.1/0?password=pw&db=1", "redis://127.0.0.1/0?password=***&db=1"),
        ("unix://:pw@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1"),
        ("redis://:a:b@c@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
    ],
)
def test_redact(url: str, expected: str) -> None:
    assert redact(url) == expected


# --- TLS -------------------------------------------------------------------------------
# The bundled redis-server is built without TLS (`--tls-port` is a bad directive), so a
# TLS-terminating proxy in front of the plain session server stands in for Redis TLS: the
# client side (rediss:// parsing, handshake, verification) is exercised for real.


@pytest.fixture
def tls_proxy(redis_server: RedisServer, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A TLS listener on 127.0.0.1 forwarding to the session Redis; yields (port, cert)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed to make a test certificate"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass  # the other side went away; closing below ends the other direction
        finally:
            writer.close()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(HOST, redis_server.port)
        await asyncio.gather(pump(reader, upstream_writer), pump(upstream_reader, writer))

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(forward, HOST, 0, ssl=context))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield server.sockets[0].getsockname()[1], cert

    async def shut_down() -> None:
        server.close()
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run_coroutine_threadsafe(shut_down(), loop).result(timeout=5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    loop.close()


def test_rediss_url_connects_over_tls(
    tls_proxy: tuple[int, Path], redis_client: redis.Redis
) -> None:
    port, cert = tls_proxy
    redis_client.set("plain", "side")
    for query in ("ssl_cert_reqs=none", f"ssl_cert_reqs=required&ssl_ca_certs={cert}"):
        client = connect(f"rediss://{HOST}:{port}/0?{query}")
        assert client.get("plain") == b"side"
        assert client.connection_pool.connection_class is redis.SSLConnection
        client.close()


def test_rediss_verifies_certificates_by_default(tls_proxy: tuple[int, Path]) -> None:
    port, _ = tls_proxy
    with pytest.raises(ServiceError, match="certificate verify failed"):
        connect(f"rediss://{HOST}:{port}/0")


def test_rediss_to_a_closed_port_fails_fast() -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(ServiceError) as caught:
        connect(f"rediss://:secret@{HOST}:{port}/0?ssl_cert_reqs=none")
    assert time.monotonic() - started < 5
    assert f"{HOST}:{port}" in str(caught.value) and "secret" not in str(caught.value)


def test_celery_ssl_options() -> None:
    assert ssl_options("redis://127.0.0.1:6379/0") is None
    assert ssl_options("rediss://127.0.0.1:6380/0") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert ssl_options(
        "rediss://127.0.0.1:6380/0?ssl_cert_reqs=CERT_NONE&ssl_ca_certs=/ca.pem"
    ) == {
        "ssl_cert_reqs": ssl.CERT_NONE,
        "ssl_ca_certs": "/ca.pem",
    }
    with pytest.raises(ParameterError):
        ssl_options("rediss://127.0.0.1:6380/0?ssl_cert_reqs=maybe")


def test_a_worker_over_tls_dead_letters_what_is_not_a_message(
    tls_proxy: tuple[int, Path], redis_url: str, tmp_path: Path
) -> None:
    """A worker on a rediss:// broker uses bgqueue's guarded transport too: raw garbage on
    its queue goes to the dead letter, and the worker keeps serving. (Before, only redis://
    had the guard: over TLS kombu's error stopped the worker.)"""
    from tests.apps import sample
    from tests.harness import APP_ID, Cluster, events, wait_for

    port, _ = tls_proxy
    tls = f"rediss://{HOST}:{port}/0?ssl_cert_reqs=none"
    cluster = Cluster(redis_url, tmp_path, env={"BGQUEUE_BROKER_URL": tls})
    try:
        worker = cluster.worker("tls", concurrency=1)
        cluster.beat()
        keys = sample.app.keys
        [class_id] = cluster.client.zrange(keys.classlive, 0, -1)
        cluster.client.lpush(keys.class_queue(class_id.decode()), b"\x00 not a message")
        wait_for(
            lambda: any("not JSON" in e.reason for e in deadletter.read(cluster.client, keys)),
            15,
            "the garbage to be dead-lettered",
        )
        producer = bg.BackgroundApp(APP_ID, permitted_identifiers=[f"{APP_ID}.*"], broker_url=tls)
        producer.scheduler.submit(bg.ProcessingTaskRequest(f"{APP_ID}.a"))
        wait_for(lambda: events(cluster.client, "end"), 15, "a request over TLS")
        assert worker.alive(), worker.log()[-2000:]
    finally:
        cluster.kill_all()
        cluster.stop_all()
