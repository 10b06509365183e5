"""Which Redis to use and how to connect to it, with errors that never show the password."""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import redis
import redis.asyncio
from redis.connection import HiredisRespSerializer
from redis.utils import HIREDIS_AVAILABLE

from bgqueue.broker.embedded import ensure_embedded_redis
from bgqueue.errors import ParameterError, ServiceError, Unavailable

ENV_BROKER_URL = "BGQUEUE_BROKER_URL"
CONNECT_TIMEOUT = 2.0  # seconds; an unreachable broker must fail fast, not hang a CLI
SOCKET_TIMEOUT = 10.0  # seconds; longer than any single command, even a large batch script
HEALTH_CHECK_INTERVAL = 30  # seconds; re-PING a connection idle this long before reusing it
# One event loop's connections at most: a thousand concurrent submits share them instead of
# opening a thousand sockets (the URL's `max_connections=` overrides it).
ASYNC_MAX_CONNECTIONS = 32

# Both clients, sync and asyncio, are made with these. No automatic retries: a retried script
# could apply a transition twice; callers that can retry safely do so themselves.
CLIENT_OPTIONS: dict[str, Any] = {
    "socket_connect_timeout": CONNECT_TIMEOUT,
    "socket_timeout": SOCKET_TIMEOUT,
    "health_check_interval": HEALTH_CHECK_INTERVAL,
    "decode_responses": False,
}

_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def resolve_broker_url(url: str | None) -> str:
    """The broker URL: the argument, else $BGQUEUE_BROKER_URL, else the embedded Redis."""
    return url or os.environ.get(ENV_BROKER_URL) or ensure_embedded_redis()


def redact(url: str) -> str:
    """The URL with its password (in the user info or a `password=` query) shown as `***`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable broker URL>"
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{hostport}"
    query = "&".join(
        f"{name}=***" if name == "password" else f"{name}={value}"
        for name, _, value in (pair.partition("=") for pair in parts.query.split("&") if pair)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def connect(url: str) -> redis.Redis:
    """A redis-py client for `url`, checked with one PING; ServiceError if unreachable."""
    try:
        client = redis.Redis.from_url(url, **CLIENT_OPTIONS)
    except ValueError:
        raise _invalid_url() from None
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        client.close()
        raise ServiceError(
            f"cannot reach the broker at {redact(url)} ({type(exc).__name__}: {exc}); "
            f"is Redis running? set {ENV_BROKER_URL} or pass broker_url"
        ) from exc
    return client


def connect_async(url: str) -> redis.asyncio.Redis:
    """A redis.asyncio client for `url` with `connect`'s options, TLS and URL checks.

    It opens nothing yet (it is made outside any coroutine, so tasks racing to make it
    cannot open a socket each); a broker that cannot be reached fails the first command,
    which `service_errors` turns into ServiceError. Its pool waits up to SOCKET_TIMEOUT
    for one of its ASYNC_MAX_CONNECTIONS connections to come free.
    """
    try:
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url, max_connections=ASYNC_MAX_CONNECTIONS, timeout=SOCKET_TIMEOUT, **CLIENT_OPTIONS
        )
    except ValueError:
        raise _invalid_url() from None
    if HIREDIS_AVAILABLE:  # the URL's connection class (TCP, TLS, Unix socket), packing in C
        base = pool.connection_class
        pool.connection_class = type(base.__name__, (_HiredisPacking, base), {})
    return redis.asyncio.Redis.from_pool(pool)  # closing the client closes its pool


class _HiredisPacking:
    """Pack commands in C with hiredis, as redis-py's sync connections do: its asyncio ones
    pack in Python, a sixth of an async submit's CPU time (a submit sends 33 arguments)."""

    _packer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        packed: list[bytes] = self._packer.pack(*args)
        return packed


def _invalid_url() -> ParameterError:
    # Not echoing the URL: a password with an unescaped '/' or '@' ends up in odd places.
    return ParameterError(
        "invalid broker URL: expected redis://[user:password@]host[:port][/db], "
        "rediss://... or unix:///path/to/socket, with special characters "
        "in the password percent-encoded"
    )


# The Redis errors `service_errors` turns into bgqueue's own.
SERVICE_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.ResponseError)


@contextmanager
def service_errors(url: str) -> Iterator[None]:
    """Turn a lost or refused broker connection into ServiceError, without the password, and
    a command Redis refused (foreign data where bgqueue keeps its own: a key of the wrong
    type, a record it did not write) into Unavailable."""
    try:
        yield
    except SERVICE_ERRORS as exc:
        raise service_error(url, exc) from exc


def service_error(url: str, exc: Exception) -> ServiceError | Unavailable:
    """What `service_errors` raises for one of SERVICE_ERRORS (for callers on a hot path,
    where entering a context manager per call costs as much as building the call)."""
    if isinstance(exc, redis.ResponseError):
        return Unavailable(
            f"Redis refused the call: {str(exc)[:300]}. Some of the app's keys hold data "
            "bgqueue did not write; beat moves such keys into the dead letter "
            "(bgqueue status shows it)"
        )
    return ServiceError(
        f"lost the broker at {redact(url)} ({type(exc).__name__}); is Redis running? "
        "nothing was changed by the failed call"
    )


def ssl_options(url: str) -> dict[str, Any] | None:
    """Celery's `broker_use_ssl`/`redis_backend_use_ssl` for a rediss:// URL, else None.

    Celery refuses a rediss:// URL without these; certificates are verified unless the URL
    says `ssl_cert_reqs=none` (or `optional`).
    """
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return None
    query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    reqs = query.get("ssl_cert_reqs", "required").lower().removeprefix("cert_")
    if reqs not in _CERT_REQS:
        raise ParameterError(f"ssl_cert_reqs must be none, optional or required, not {reqs!r}")
    options: dict[str, Any] = {"ssl_cert_reqs": _CERT_REQS[reqs]}
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if name in query:
            options[name] = query[name]
    return options
