"""Running Flower on bgqueue's broker, always behind a login."""

from __future__ import annotations

from celery import Celery

from bgqueue.celery_config import celery_config
from bgqueue.errors import ParameterError


def run_flower(broker_url: str, address: str, port: int, basic_auth: str) -> None:
    """Start Flower (blocking) with basic auth; the login is never logged by bgqueue."""
    user, sep, password = basic_auth.partition(":")
    if not sep or not user or not password:
        raise ParameterError("the Flower login must look like USER:PASSWORD")
    celery = Celery("bgqueue-flower", set_as_current=False)
    celery.conf.update(celery_config(broker_url))
    celery.start(
        [
            "flower",
            f"--address={address}",
            f"--port={port}",
            f"--basic-auth={basic_auth}",
            # Flower must not fall back to the default inspection timeouts of a minute.
            "--inspect-timeout=2000",
        ]
    )
