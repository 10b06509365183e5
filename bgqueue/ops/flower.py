"""Running Flower on bgqueue's broker, always behind a login.

Every registered identifier is a Celery task of the same name, so Flower lists each kind
of work under its own name. A run that did not succeed ends its Celery task with
`TaskUnsuccessful`, `TaskFailed` or `TaskExpired` (bgqueue.errors) once its outcome is
recorded, so Flower shows it as FAILURE with that exception; a success shows as SUCCESS
with a result naming its outcome and scope.

Pending requests are not Celery messages, so Flower cannot show them: `run_flower` adds
bgqueue's own page of them to Flower, under Flower's login (bgqueue/backlog/).
"""

from __future__ import annotations

from celery import Celery

from bgqueue.errors import ParameterError
from bgqueue.ops.backlog import web as backlog_web
from bgqueue.worker.celery_config import celery_config

# The tasks page's columns: the identifier, its state, its scope (kwargs: scope, gen, and
# `requires`, the names of its requirements), how long and where it ran, its outcome (the
# exception of a run that did not succeed, the result of one that did), when it was
# received; the uuid (a link to the task's page) comes last.
TASKS_COLUMNS = "name,state,kwargs,runtime,worker,exception,result,received,uuid"


def run_flower(broker_url: str, address: str, port: int, basic_auth: str) -> None:
    """Start Flower (blocking) with basic auth; the login is never logged by bgqueue."""
    user, sep, password = basic_auth.partition(":")
    if not sep or not user or not password:
        raise ParameterError("the Flower login must look like USER:PASSWORD")
    if "," in basic_auth:
        # Flower splits --basic-auth at commas into several logins: "admin:a,b" would
        # also let in anyone who sends the bare credential "b".
        raise ParameterError("the Flower login must not contain a comma")
    backlog_web.install(broker_url)  # /bgqueue/pending, before Flower builds its routes
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
            f"--tasks-columns={TASKS_COLUMNS}",
        ]
    )
