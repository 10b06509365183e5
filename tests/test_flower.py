"""Flower on bgqueue: behind a login, every identifier under its own name, every outcome told
apart, and the tasks page as a real headless Chromium renders it.

Real processes throughout: `bgqueue flower` on a free port, `bgqueue beat`, a `bgqueue
worker` running tests/apps/news.py (one identifier per outcome), and Debian's `chromium`.
Set BGQUEUE_FLOWER_SCREENSHOT=docs/flower.png to also save the browser test's screenshot
there (the README's picture).
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

import bgqueue as bg
from bgqueue.broker.embedded import free_port
from tests.apps import news
from tests.harness import REPO, Cluster, wait_for

NEWS_APP = "tests.apps.news:app"
LOGIN = "tester:" + uuid.uuid4().hex
SCREENSHOT_ENV = "BGQUEUE_FLOWER_SCREENSHOT"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    # Virtual time runs the page's scripts and waits for their requests (the table's data).
    "--virtual-time-budget=5000",
]
# What Flower must show for each run of tests/apps/news.py: state, and the start of the
# exception (a run that did not succeed) or of the result (a success).
EXPECTED = {
    news.CLEANUP: ("FAILURE", "TaskUnsuccessful('set_task_completed(success=False) (scope default"),
    news.FEEDS: ("FAILURE", "TaskFailed('ConnectionError: feed server unreachable (scope default"),
    news.EXPORT: ("FAILURE", "TaskExpired('did not complete by its deadline (scope default"),
    news.REFRESH: ("SUCCESS", "{'outcome': 'completed', 'success': True, 'scope': 'default'}"),
}
# The requirements submit_news gives each request in the default scope (none: []).
REQUIRES = {news.CLEANUP: ["network", "external_power"]}


# --- helpers ----------------------------------------------------------------------------


def http(port: int, path: str, login: str | None = None, method: str = "GET") -> tuple[int, bytes]:
    """One request to Flower: (status, body); with a login, as HTTP basic auth."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    if login is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def answers(port: int) -> bool:
    """Whether Flower's web server is up (it answers, if only with a refusal)."""
    try:
        return http(port, "/")[0] > 0
    except OSError:
        return False


def start_flower(
    cluster: Cluster, *args: str, env: dict[str, str] | None = None, name: str = "flower"
) -> int:
    """Start `bgqueue flower` on a free port and wait until it answers; returns the port."""
    port = free_port()
    proc = cluster.start(["flower", "--port", str(port), *args], name, env)
    wait_for(lambda: answers(port) or not proc.alive(), 30, "Flower to answer")
    assert proc.alive(), proc.log()
    return port


def api_tasks(port: int) -> dict[str, dict[str, Any]]:
    status, body = http(port, "/api/tasks", LOGIN)
    assert status == 200, body
    tasks: dict[str, dict[str, Any]] = json.loads(body)
    return tasks


def runs_seen(port: int) -> list[dict[str, Any]]:
    """Flower's tasks that are runs (not duplicate messages bgqueue skipped as stale)."""
    return [t for t in api_tasks(port).values() if "'outcome': 'stale'" not in (t["result"] or "")]


def submit_news(app: bg.BackgroundApp) -> None:
    """One request per outcome in the default scope (the cleanup needing network and
    power), and a refresh needing network in scope kiosk-7."""
    app.scheduler.submit_many(
        [
            bg.ProcessingTaskRequest(
                news.CLEANUP, requires_network_connectivity=True, requires_external_power=True
            ),
            bg.ProcessingTaskRequest(news.FEEDS),
            bg.ProcessingTaskRequest(news.EXPORT),
            bg.AppRefreshTaskRequest(news.REFRESH),
        ]
    )
    app.scheduler_for("kiosk-7").submit(
        bg.AppRefreshTaskRequest(news.REFRESH, requires_network_connectivity=True)
    )


def all_ended(port: int, count: int) -> list[dict[str, Any]] | None:
    """Flower's runs once `count` of them have ended (SUCCESS or FAILURE)."""
    seen = runs_seen(port)
    ended = [t for t in seen if t["state"] in ("SUCCESS", "FAILURE")]
    return seen if len(ended) >= count else None


def chromium(tmp_path: Path, url: str, *args: str) -> str:
    """Run Debian's headless chromium on `url` with `args`; returns its standard output."""
    exe = shutil.which("chromium")
    assert exe, "needs Debian's chromium on PATH (`make test` installs it)"
    profile = tmp_path / f"chromium-{uuid.uuid4().hex[:8]}"
    command = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url]
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its helper processes go with it
    ) as browser:
        try:
            out, _ = browser.communicate(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(browser.pid, signal.SIGKILL)
    assert browser.returncode == 0, f"chromium exited with {browser.returncode}"
    return out.decode(errors="replace")


def pid_gone(pid: int) -> bool:
    """Whether a process has exited (a zombie not yet reaped counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def table_rows(dom: str) -> list[str]:
    """The text of each row of the rendered tasks table."""
    body = dom[dom.find("<tbody") : dom.find("</tbody>")]
    rows = body.split("<tr")[1:]
    return [html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", row))) for row in rows]


@pytest.fixture
def news_app(redis_url: str) -> bg.BackgroundApp:
    news.app._client = None  # a previous test's connection points at the same server
    news.app.use_broker(redis_url)
    return news.app


@pytest.fixture
def watched(cluster: Cluster, news_app: bg.BackgroundApp) -> Iterator[int]:
    """Flower (started first, so it sees every event), beat and a news worker; yields
    Flower's port once Flower has heard from the worker."""
    port = start_flower(cluster, "--basic-auth", LOGIN)
    cluster.beat()
    conditions = ["network=ethernet", "external_power=true"]  # whatever this machine has
    cluster.worker("w1", conditions, app=NEWS_APP, app_id=news.APP_ID)

    def worker_seen() -> bool:
        status, body = http(port, "/api/workers?status=true", LOGIN)
        return status == 200 and any(json.loads(body).values())

    wait_for(worker_seen, 20, "Flower to hear from the worker")
    yield port
    cluster.kill_all()  # graceful shutdowns are not what these tests check


# --- tests ------------------------------------------------------------------------------


def test_flower_requires_a_login_and_its_api_rejects_anonymous_calls(cluster: Cluster) -> None:
    """`bgqueue flower` without a login makes one and prints it; every page and API call is
    refused (401) without it or with a wrong password, the API even for a POST that would
    publish a task; the printed login is let in. FLOWER_BASIC_AUTH sets the login, and a
    malformed login (no password, or a comma Flower would split at) is refused up front."""
    cluster.env.pop("FLOWER_BASIC_AUTH", None)
    port = start_flower(cluster)
    (proc,) = cluster.procs
    printed = wait_for(
        lambda: re.search(r"Flower login \(generated\): (\S+)", proc.log()), 10, "the login"
    )
    login = printed.group(1)
    user, _, password = login.partition(":")
    assert user and len(password) >= 12

    paths = ["/", "/tasks", "/workers", "/tasks/datatable", "/api/tasks", "/api/workers"]
    paths += ["/api/task/types", f"/api/task/info/{uuid.uuid4()}"]
    for path in paths:
        assert http(port, path)[0] == 401, f"{path} without a login"
        assert http(port, path, f"{user}:wrong")[0] == 401, f"{path} with a wrong password"
    publish = f"/api/task/async-apply/{news.REFRESH}"
    assert http(port, publish, method="POST")[0] == 401
    assert proc.log().count(password) == 1  # printed once, and never logged

    status, body = http(port, "/api/tasks", login)
    assert (status, json.loads(body)) == (200, {})
    assert http(port, "/tasks", login)[0] == 200
    assert http(port, "/api/workers?status=true", login)[0] == 200

    from_env = "env:" + uuid.uuid4().hex
    env_port = start_flower(cluster, env={"FLOWER_BASIC_AUTH": from_env}, name="flower-env")
    assert http(env_port, "/api/tasks")[0] == 401
    assert http(env_port, "/api/tasks", from_env)[0] == 200
    assert "generated" not in cluster.procs[-1].log()

    for bad in ("admin", "admin:", "admin:pass,word"):
        refused = subprocess.run(
            [sys.executable, "-m", "bgqueue", "flower", "--basic-auth", bad],
            cwd=REPO,
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert refused.returncode != 0 and "login must" in refused.stderr, (bad, refused)


def test_each_identifier_shows_with_its_outcome(
    cluster: Cluster, news_app: bg.BackgroundApp, watched: int
) -> None:
    """Every run shows under its identifier, with its scope (kwargs) and worker: a success as
    SUCCESS with its outcome and runtime; an unsuccessful completion, a raising handler and
    an expiry as FAILURE with TaskUnsuccessful, TaskFailed and TaskExpired saying what
    happened and how long it took; never a WorkerLostError. bgqueue's history is unchanged."""
    submit_news(news_app)
    seen = wait_for(lambda: all_ended(watched, 5), 20, "Flower to see all five runs end")
    by_name: dict[str, list[dict[str, Any]]] = {}
    for task in seen:
        by_name.setdefault(task["name"], []).append(task)
    assert sorted((name, len(tasks)) for name, tasks in by_name.items()) == sorted(
        [(news.CLEANUP, 1), (news.FEEDS, 1), (news.EXPORT, 1), (news.REFRESH, 2)]
    )
    for name, (state, shown) in EXPECTED.items():
        (task,) = [t for t in by_name[name] if "'scope': 'default'" in t["kwargs"]]
        assert task["state"] == state, task
        assert (task["exception"] if state == "FAILURE" else task["result"]).startswith(shown)
        assert task["worker"].startswith("w1@"), task
        assert task["kwargs"].startswith("{'scope': 'default', 'gen': "), task
        # Requirements by name, not a profile number.
        assert task["kwargs"].endswith(f"'requires': {REQUIRES.get(name, [])}}}"), task
    kiosk = next(t for t in by_name[news.REFRESH] if "kiosk-7" in t["kwargs"])
    assert kiosk["state"] == "SUCCESS" and "'scope': 'kiosk-7'" in kiosk["result"]
    assert kiosk["kwargs"].endswith("'requires': ['network']}"), kiosk
    assert kiosk["runtime"] >= 0.2  # the handler sleeps 0.2 s
    (expired,) = by_name[news.EXPORT]
    took = float(re.findall(r", ([\d.]+) s\)", expired["exception"])[0])
    assert 2.0 - 0.05 <= took <= 2.0 + 1.0, expired["exception"]  # the 2 s budget
    assert not any("WorkerLost" in (t["exception"] or "") for t in seen)

    history = {r.identifier: (r.state, r.success) for r in news_app.scheduler.history()}
    assert history == {
        news.CLEANUP: ("completed", False),
        news.FEEDS: ("failed", False),
        news.EXPORT: ("expired", False),
        news.REFRESH: ("completed", True),
    }


def test_a_body_that_ignores_its_interruption_is_killed_and_still_shows_expired(
    cluster: Cluster, news_app: bg.BackgroundApp, watched: int, redis_client: redis.Redis
) -> None:
    """A body that swallows the interruption at its deadline has its pool process killed a
    second later; Celery then delivers the message again, and that copy reports the run's
    recorded outcome: Flower shows TaskExpired, not a lost worker or a skipped duplicate.
    The worker goes on serving, and the request is not run again."""
    news_app.scheduler.submit(bg.ProcessingTaskRequest(news.STUBBORN))
    pid = int(wait_for(lambda: redis_client.lindex(news.PIDS, 0), 10, "the body to start"))
    (record,) = wait_for(news_app.scheduler.history, 10, "the run to be recorded")
    assert (record.state, record.success) == ("expired", False)
    wait_for(lambda: pid_gone(pid), 5, "the stubborn body's pool process to be killed")

    def shown() -> dict[str, Any] | None:
        (task,) = api_tasks(watched).values()
        return task if task["state"] in ("SUCCESS", "FAILURE") else None

    task = wait_for(shown, 15, "Flower to show the run's end")
    assert task["state"] == "FAILURE", task
    assert task["exception"].startswith(
        "TaskExpired('did not complete by its deadline (scope default, run 1, 2."
    ), task

    news_app.scheduler.submit(bg.AppRefreshTaskRequest(news.REFRESH))
    wait_for(lambda: len(news_app.scheduler.history()) == 2, 10, "the next request to run")
    assert news_app.scheduler.history()[0].identifier == news.REFRESH
    assert redis_client.llen(news.PIDS) == 1  # the stubborn request did not run again


def test_tasks_page_in_headless_chromium(
    cluster: Cluster, news_app: bg.BackgroundApp, watched: int, tmp_path: Path
) -> None:
    """Headless Chromium with the login renders Flower's tasks page with a row per run: its
    identifier, state, scope and outcome; without the login it shows no task. The
    screenshot is a real PNG (saved to $BGQUEUE_FLOWER_SCREENSHOT if set)."""
    submit_news(news_app)
    wait_for(lambda: all_ended(watched, 5), 20, "Flower to see all five runs end")
    user, _, password = LOGIN.partition(":")
    page = f"http://{user}:{password}@127.0.0.1:{watched}/tasks"

    rows = table_rows(chromium(tmp_path, page, "--dump-dom"))
    assert len(rows) == 5, rows
    for name, (state, shown) in EXPECTED.items():
        row = next(r for r in rows if f" {name} " in r and "'scope': 'default'" in r)
        assert f" {state} " in row and shown in row, row
        assert f"'requires': {REQUIRES.get(name, [])}}}" in row, row
    kiosk = "'scope': 'kiosk-7', 'gen': "
    assert any(news.REFRESH in r and kiosk in r and "'requires': ['network']}" in r for r in rows)

    # Refused (401): Chromium renders nothing of the page, let alone a task.
    anonymous = chromium(tmp_path, f"http://127.0.0.1:{watched}/tasks", "--dump-dom")
    assert news.APP_ID not in anonymous and "Task history" not in anonymous.title()

    shot = tmp_path / "flower.png"
    chromium(tmp_path, page, f"--screenshot={shot}", "--window-size=2000,600")
    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and 10_000 < len(png) < 300_000, len(png)
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copyfile(shot, REPO / os.environ[SCREENSHOT_ENV])
