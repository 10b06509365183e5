"""The `bgqueue` command line. Errors print one line and exit non-zero, never a traceback."""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import click

from bgqueue.app import BackgroundApp
from bgqueue.broker import ENV_BROKER_URL, connect, redact, resolve_broker_url
from bgqueue.errors import BackgroundTaskError, ParameterError
from bgqueue.model.conditions import parse_overrides
from bgqueue.model.requests import (
    REQUEST_CLASSES,
    ContinuedProcessingTaskRequest,
    FileProtectionType,
    HealthResearchTaskRequest,
    Kind,
)
from bgqueue.ops.loader import load_app
from bgqueue.telemetry import logs, metrics

F = TypeVar("F", bound=Callable[..., Any])

broker_option = click.option(
    "--broker",
    "broker",
    default=None,
    metavar="URL",
    help=f"Redis URL (default: ${ENV_BROKER_URL}, else the embedded Redis).",
)
app_option = click.option(
    "--app",
    "app_spec",
    required=True,
    metavar="MODULE:ATTR",
    help="The BackgroundApp, as module:attribute or path/file.py:attribute.",
)
scope_option = click.option(
    "--scope", default="default", show_default=True, help="The scope (device)."
)
metrics_port_option = click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    envvar="BGQUEUE_METRICS_PORT",
    help="Serve Prometheus metrics on this port (default: $BGQUEUE_METRICS_PORT, else off).",
)
metrics_address_option = click.option(
    "--metrics-address",
    default="127.0.0.1",
    show_default=True,
    envvar="BGQUEUE_METRICS_ADDRESS",
    help="Address the metrics port binds to.",
)
log_format_option = click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    envvar="BGQUEUE_LOG_FORMAT",
    help="json: one JSON object per line, naming app, scope, identifier and request id.",
)


def _app(app_spec: str, broker: str | None) -> BackgroundApp:
    app = load_app(app_spec)
    if broker:
        app.use_broker(broker)
    return app


@click.group()
def main() -> None:
    """bgqueue: background tasks on Celery + Redis."""


@main.command()
@app_option
@broker_option
@click.option("--name", default=None, help="Worker name, shown in history and status.")
@click.option(
    "--condition",
    "conditions",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a probed condition, e.g. external_power=false (repeatable).",
)
@click.option("--concurrency", type=click.IntRange(1, 512), default=None, help="Pool processes.")
@click.option("--continuous", is_flag=True, help="Also run continuous (long-running) tasks.")
@click.option("--loglevel", default="INFO", show_default=True)
@log_format_option
@metrics_port_option
@metrics_address_option
def worker(
    app_spec: str,
    broker: str | None,
    name: str | None,
    conditions: tuple[str, ...],
    concurrency: int | None,
    continuous: bool,
    loglevel: str,
    log_format: str,
    metrics_port: int | None,
    metrics_address: str,
) -> None:
    """Run a worker for an app's registered handlers."""
    from bgqueue.worker.heartbeat import CONDITIONS_ENV, CONTINUOUS_ENV, NAME_ENV

    os.environ[CONTINUOUS_ENV] = "1" if continuous else "0"
    overrides = parse_overrides(conditions)
    app = _app(app_spec, broker)
    name = name or f"{socket.gethostname()}-{os.getpid()}"
    os.environ[NAME_ENV] = name
    os.environ[CONDITIONS_ENV] = ",".join(f"{k}={v}" for k, v in overrides.items())
    app.client  # noqa: B018 -- fail with ServiceError now, not inside Celery
    logs.use_in_celery(log_format, loglevel)
    if metrics_port is not None:  # before the pool forks: pool processes count into it
        metrics.serve_worker(metrics_port, metrics_address)
        metrics.count_from_zero(app.app_id)
    argv = ["worker", f"--hostname={name}@%h", f"--loglevel={loglevel}", "--pool=prefork"]
    # Mingle and gossip sync Celery-level state bgqueue keeps in Redis; they only slow start-up.
    argv += ["--without-mingle", "--without-gossip"]
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    if log_format == "json":  # the start-up banner is plain text on stdout
        argv.insert(0, "--quiet")
    app.celery.worker_main(argv)


@main.command()
@broker_option
@click.option("--loglevel", default="INFO", show_default=True)
@log_format_option
@metrics_port_option
@metrics_address_option
def beat(
    broker: str | None,
    loglevel: str,
    log_format: str,
    metrics_port: int | None,
    metrics_address: str,
) -> None:
    """Run beat: dispatch due requests to capable workers (one leads, others stand by)."""
    from bgqueue.beat import Beat

    logs.configure(log_format, loglevel)
    process = Beat(resolve_broker_url(broker))
    if metrics_port is not None:
        process.metrics = metrics.serve_beat(metrics_port, metrics_address)
    signal.signal(signal.SIGTERM, lambda *_: process.stop())
    logging.getLogger("bgqueue.beat").info(
        "beat %s on %s", process.token, redact(resolve_broker_url(broker))
    )
    try:
        process.run()
    except KeyboardInterrupt:
        process.stop()


@main.command()
@broker_option
@click.option("--address", default="127.0.0.1", show_default=True)
@click.option("--port", default=5555, show_default=True)
@click.option(
    "--basic-auth",
    "basic_auth",
    default=None,
    metavar="USER:PASSWORD",
    help="Login (default: $FLOWER_BASIC_AUTH, else a generated one, printed).",
)
def flower(broker: str | None, address: str, port: int, basic_auth: str | None) -> None:
    """Run Flower on the broker, behind a login."""
    from bgqueue.ops.flower import run_flower

    login = basic_auth or os.environ.get("FLOWER_BASIC_AUTH")
    if not login:
        # Never an open Flower: with no login given, make one and show it once, here only.
        login = f"admin:{secrets.token_urlsafe(12)}"
        click.echo(f"Flower login (generated): {login}")
    click.echo(f"Flower on http://{address}:{port}")
    run_flower(resolve_broker_url(broker), address, port, login)


@main.command()
@app_option
@broker_option
@scope_option
@click.argument("identifier")
@click.option(
    "--kind", type=click.Choice([k.value for k in Kind]), default="processing", show_default=True
)
@click.option("--in", "delay", type=float, default=0.0, help="Earliest begin, seconds from now.")
@click.option("--network", is_flag=True, help="Requires network connectivity.")
@click.option("--power", is_flag=True, help="Requires external power.")
@click.option(
    "--protection",
    type=click.Choice([p.value for p in FileProtectionType]),
    default=None,
    help="Health research: data protection required.",
)
@click.option("--payload", default="null", help="JSON payload.")
@click.option("--title", default="", help="Continued processing: title.")
@click.option("--strategy", type=click.Choice(["fail", "queue"]), default="fail")
def submit(
    app_spec: str,
    broker: str | None,
    scope: str,
    identifier: str,
    kind: str,
    delay: float,
    network: bool,
    power: bool,
    protection: str | None,
    payload: str,
    title: str,
    strategy: str,
) -> None:
    """Submit a request (replacing the pending one with the same identifier)."""
    app = _app(app_spec, broker)
    try:
        body = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise ParameterError(f"--payload is not JSON: {exc}") from None
    fields: dict[str, Any] = {
        "earliest_begin_date": datetime.now(UTC) + timedelta(seconds=delay) if delay else None,
        "requires_network_connectivity": network,
        "requires_external_power": power,
        "payload": body,
    }
    cls = REQUEST_CLASSES[Kind(kind)]
    if cls is HealthResearchTaskRequest and protection:
        fields["protection_type_of_required_data"] = FileProtectionType(protection)
    if cls is ContinuedProcessingTaskRequest:
        fields.update(title=title, strategy=strategy)
    app.scheduler_for(scope).submit(cls(identifier, **fields))
    click.echo(f"submitted {identifier} ({kind}) in scope {scope}")


@main.command()
@app_option
@broker_option
@scope_option
def pending(app_spec: str, broker: str | None, scope: str) -> None:
    """List the scope's requests not yet started."""
    for request in _app(app_spec, broker).scheduler_for(scope).pending_task_requests():
        begin = request.earliest_begin_date.isoformat() if request.earliest_begin_date else "now"
        flags = [
            f
            for f, on in (
                ("network", request.requires_network_connectivity),
                ("power", request.requires_external_power),
            )
            if on
        ]
        click.echo(
            f"{request.identifier}\t{request.kind}\tnot before {begin}\t{','.join(flags) or '-'}"
        )


@main.command()
@app_option
@broker_option
@scope_option
@click.argument("identifier", required=False)
@click.option(
    "--all", "everything", is_flag=True, help="Cancel every pending request of the scope."
)
def cancel(
    app_spec: str, broker: str | None, scope: str, identifier: str | None, everything: bool
) -> None:
    """Cancel a pending request, or all of a scope's."""
    scheduler = _app(app_spec, broker).scheduler_for(scope)
    if everything == bool(identifier):
        raise ParameterError("give either an IDENTIFIER or --all")
    count = scheduler.cancel_all() if everything else int(scheduler.cancel(identifier or ""))
    click.echo(f"cancelled {count}")


@main.command()
@app_option
@broker_option
@scope_option
@click.argument("action", type=click.Choice(["launch", "expire"]))
@click.argument("identifier")
def simulate(app_spec: str, broker: str | None, scope: str, action: str, identifier: str) -> None:
    """Launch a pending request now, or expire a running one now (for development)."""
    scheduler = _app(app_spec, broker).scheduler_for(scope)
    if action == "launch":
        if not scheduler.simulate_launch(identifier):
            raise ParameterError(f"no pending request {identifier!r} in scope {scope!r}")
        click.echo(f"launching {identifier}")
    else:
        count = scheduler.simulate_expiration(identifier)
        if not count:
            raise ParameterError(f"no running task {identifier!r} in scope {scope!r}")
        click.echo(f"expiring {count} running task(s) of {identifier}")


@main.command()
@broker_option
@click.option(
    "--check-worker",
    "check_worker",
    default=None,
    metavar="NAME",
    help="Only say whether worker NAME's heartbeat is live (any app); exit 1 if it is not.",
)
def status(broker: str | None, check_worker: str | None) -> None:
    """Beat leader; per app: workers, requests, continuous tasks, transient delays and
    quota per scope, efficiency grants and works."""
    from bgqueue.ops.status import report

    if check_worker is not None:
        _check_worker(connect(resolve_broker_url(broker)), check_worker)
        return
    click.echo(report(connect(resolve_broker_url(broker))))


def _check_worker(client: Any, name: str) -> None:
    """A health check's answer: one line, exit 0 when live, 1 when not (2, as for every
    error, when the broker cannot be read), so a probe can tell a dead worker apart."""
    from bgqueue.ops.status import worker_liveness

    live, line = worker_liveness(client, name)
    click.echo(line)
    if not live:
        sys.exit(1)


@main.command()
@broker_option
@click.option("--flower-port", default=5555, show_default=True)
def demo(broker: str | None, flower_port: int) -> None:
    """Embedded Redis, beat, workers, Flower and a narrated example app, until Ctrl-C."""
    from bgqueue.ops.demo import run_demo

    run_demo(resolve_broker_url(broker), flower_port)


def run() -> None:
    """Entry point: one clear line and a non-zero exit for every failure."""
    try:
        main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except BackgroundTaskError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # the promise is one line, never a traceback
        click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    run()
