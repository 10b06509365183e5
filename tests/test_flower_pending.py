"""bgqueue's pending page inside Flower (/bgqueue/pending, bgqueue/ops/backlog/): under Flower's
login, every reason a request waits, paging that never reads more than a page, and a cancel
that only the page itself can send.

Real processes throughout: `bgqueue flower`, `bgqueue beat` and `bgqueue worker`s of
tests/apps/sample.py on the test Redis, and Debian's headless `chromium`, driven over the
DevTools protocol (tests/browser.py) to follow links and press Cancel. Set
BGQUEUE_PENDING_SCREENSHOT=docs/flower-pending.png to also save the screenshot there (the
README's picture).
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.cookiejar import CookieJar
from pathlib import Path

import pytest
import redis

import bgqueue as bg
from bgqueue.model.keys import AppKeys
from bgqueue.ops.backlog.listing import slices
from tests.browser import Browser
from tests.harness import APP_ID, REPO, Cluster, events, wait_for
from tests.test_flower import LOGIN, chromium, http, start_flower

PAGE = "/bgqueue/pending"
SCREENSHOT_ENV = "BGQUEUE_PENDING_SCREENSHOT"
T = "com.bgqueue.test."
KEYS = AppKeys(APP_ID)
LOBBY = "<em>lobby</em>"  # a scope is user data: the page must show it, not render it


# --- helpers ----------------------------------------------------------------------------


def text(fragment: str) -> str:
    """The text of an HTML fragment, whitespace collapsed."""
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", fragment))).strip()


def rows(dom: str) -> list[dict[str, str]]:
    """The listing's rows: each column's text (the last, Cancel, left out) and the row's
    reason as the page marks it."""
    names = ["scope", "identifier", "kind", "reason", "begin", "requires", "attempts", "since"]
    names.append("payload")
    found = []
    for reason, row in re.findall(r'<tr data-reason="(\w+)">(.*?)</tr>', dom, re.S):
        cells = [text(cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
        found.append({"reason_key": reason, **dict(zip(names, cells[:-1], strict=True))})
    return found


def counts(dom: str) -> dict[str, int]:
    """The counts table's total per reason."""
    table = dom[dom.index('<table class="counts">') :]
    table = table[: table.index("</table>")]
    pairs = re.findall(r'<span class="reason (\w+)">.*?<b>([\d,]+)</b>', table, re.S)
    return {reason: int(n.replace(",", "")) for reason, n in pairs}


def logged_in(path: str, port: int) -> str:
    """The page's URL with the login in it, as Chromium takes it."""
    user, _, password = LOGIN.partition(":")
    return f"http://{user}:{password}@127.0.0.1:{port}{path}"


def record(client: redis.Redis, scope: str, identifier: str) -> dict[str, object] | None:
    """A request's record in its scope's hash, as the Lua scripts keep it (None: none)."""
    raw = client.hget(KEYS.requests(scope), identifier)
    return json.loads(raw) if raw else None


@pytest.fixture
def flower(cluster: Cluster) -> Iterator[int]:
    """`bgqueue flower` with the test login; yields its port."""
    yield start_flower(cluster, "--basic-auth", LOGIN)
    cluster.kill_all()  # a graceful shutdown is not what these tests check


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    session = Browser(tmp_path)
    yield session
    session.close()


class Session:
    """Plain HTTP to Flower with the login and a cookie jar, as a form-posting client."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.jar = CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))
        self.auth = "Basic " + base64.b64encode(LOGIN.encode()).decode()

    def request(
        self, path: str, form: dict[str, str] | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, str]:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data)
        request.add_header("Authorization", self.auth)
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with self.opener.open(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()


# --- tests ------------------------------------------------------------------------------


def test_the_page_has_flowers_login_and_only_it_can_cancel(
    flower: int, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """Without Flower's login (or with a wrong password) the page and its cancel action are
    401, as every Flower page. Flower's navbar links to the page. A cancel POST that does
    not come from the page is refused with 403 and cancels nothing: no form token, a token
    from a cross-site page, or a foreign Origin. The page's own form cancels (a redirect
    back to the page, which says so), and the request is gone from Redis."""
    port = flower
    later = datetime.now(UTC) + timedelta(hours=2)
    sample_app.scheduler_for("kiosk-1").submit(bg.ProcessingTaskRequest(T + "a", later))
    user, _, _ = LOGIN.partition(":")
    cancel = f"{PAGE}/cancel"
    for login in (None, f"{user}:wrong"):
        assert http(port, PAGE, login)[0] == 401
        assert http(port, f"{PAGE}?app={APP_ID}", login)[0] == 401
        assert http(port, cancel, login, method="POST")[0] == 401
    status, navbar = http(port, "/workers", LOGIN)
    assert status == 200 and f'href="{PAGE}">Pending</a>' in navbar.decode()

    session = Session(port)
    status, page = session.request(PAGE)
    assert status == 200 and "com.bgqueue.test.a" in page
    token = re.search(r'name="_xsrf" value="([^"]+)"', page)
    assert token and any(cookie.name == "_xsrf" for cookie in session.jar)
    form = {"app": APP_ID, "target_scope": "kiosk-1", "target_identifier": T + "a"}
    origin = f"http://127.0.0.1:{port}"
    refused = [
        ({}, {"Origin": origin}),  # no token
        ({"_xsrf": token[1]}, {"Sec-Fetch-Site": "cross-site", "Origin": "http://evil.test"}),
        ({"_xsrf": token[1]}, {"Origin": "http://evil.test"}),  # an older browser
        ({"_xsrf": "2|00|11|22"}, {"Origin": origin}),  # not the cookie's token
    ]
    for extra, headers in refused:
        assert session.request(cancel, {**form, **extra}, headers)[0] == 403, headers
    assert record(redis_client, "kiosk-1", T + "a") is not None

    same = {"Origin": origin, "Sec-Fetch-Site": "same-origin"}
    status, after = session.request(cancel, {**form, "_xsrf": token[1]}, same)
    assert status == 200 and "Cancelled com.bgqueue.test.a in scope kiosk-1." in after
    assert record(redis_client, "kiosk-1", T + "a") is None
    assert sample_app.scheduler_for("kiosk-1").history()[0].state == "cancelled"
    status, again = session.request(cancel, {**form, "_xsrf": token[1]}, same)
    assert status == 200 and "was no longer waiting" in again


def test_each_reason_in_headless_chromium_and_cancel_from_the_page(
    flower: int,
    cluster: Cluster,
    sample_app: bg.BackgroundApp,
    redis_client: redis.Redis,
    browser: Browser,
    tmp_path: Path,
) -> None:
    """Headless Chromium logged in shows the counts and a row per waiting request with why
    it waits: a future date (not due), external power with only an unpowered worker live
    (no capable worker, one of them a run lost with its worker: attempt 1), an identifier
    no live worker has the handler for (no handler), and a request queued behind a busy
    worker (dispatched); with its earliest begin, requirement names and attempts, and user
    data (a scope, a payload) shown as text, never as markup. Anonymous Chromium gets
    nothing of it. Cancel in the page cancels: the row and the Redis record are gone."""
    port = flower
    omit = {"TEST_OMIT": T + "c"}  # an older build: no handler for com.bgqueue.test.c
    plain = ["external_power=false", "network=ethernet"]
    cluster.beat()
    cluster.worker("plain", plain, concurrency=1, env=omit, wait=False)
    mains = cluster.worker("mains", ["external_power=true"], env=omit)
    wait_for(lambda: cluster.worker_alive("plain"), 30, "worker plain")

    # A run on the powered worker, lost with it: back to pending with one attempt made,
    # needing power that no live worker has.
    sample_app.scheduler_for("edge-1").submit(
        bg.ProcessingTaskRequest(T + "slow", requires_external_power=True, payload={"sleep": 60})
    )
    wait_for(lambda: events(redis_client, "start", T + "slow"), 15, "the powered run to start")
    mains.kill()
    wait_for(lambda: not cluster.worker_alive("mains"), 10, "mains to lapse")
    in_an_hour = datetime.now(UTC) + timedelta(hours=1)
    sample_app.scheduler_for(LOBBY).submit(
        bg.ProcessingTaskRequest(
            T + "a", in_an_hour, requires_network_connectivity=True, payload={"note": "<i>x</i>"}
        )
    )
    sample_app.scheduler_for("kiosk-7").submit_many(
        [
            bg.ProcessingTaskRequest(T + "b", requires_external_power=True),
            bg.ProcessingTaskRequest(T + "c"),
        ]
    )
    # The unpowered worker's one slot busy, so the next request it is sent waits queued.
    sample_app.scheduler_for("busy").submit(
        bg.ProcessingTaskRequest(T + "process", payload={"sleep": 60})
    )
    wait_for(lambda: events(redis_client, "start", T + "process"), 15, "the busy run to start")
    sample_app.scheduler_for("queued").submit(bg.AppRefreshTaskRequest(T + "refresh"))

    def settled() -> bool:
        lost = record(redis_client, "edge-1", T + "slow") or {}
        parked = record(redis_client, "kiosk-7", T + "c") or {}
        queued = record(redis_client, "queued", T + "refresh") or {}
        return (lost.get("s"), lost.get("a"), parked.get("s"), queued.get("s")) == (
            "pending",
            1,
            "parked",
            "dispatched",
        )

    wait_for(settled, 20, "the lost run back to pending, c parked and the refresh queued")

    dom = browser.goto(logged_in(f"{PAGE}?app={APP_ID}", port))
    assert counts(dom) == {"no_handler": 1, "no_capable_worker": 2, "not_due": 1, "dispatched": 1}
    shown = {(r["scope"], r["identifier"]): r for r in rows(dom)}
    assert set(shown) == {
        ("kiosk-7", T + "c"),
        ("edge-1", T + "slow"),
        ("kiosk-7", T + "b"),
        (LOBBY, T + "a"),
        ("queued", T + "refresh"),
    }
    expected = {
        ("kiosk-7", T + "c"): ("no handler", "none", "0"),
        ("edge-1", T + "slow"): ("no capable worker", "external_power", "1"),
        ("kiosk-7", T + "b"): ("no capable worker", "external_power", "0"),
        (LOBBY, T + "a"): ("not due", "network", "0"),
        ("queued", T + "refresh"): ("dispatched", "none", "0"),
    }
    for key, (reason, requires, attempts) in expected.items():
        row = shown[key]
        assert (row["reason"], row["requires"], row["attempts"]) == (reason, requires, attempts)
    assert [r["reason_key"] for r in rows(dom)] == [
        "no_handler",
        "no_capable_worker",
        "no_capable_worker",
        "not_due",
        "dispatched",
    ]  # in the order of the counts
    assert shown[(LOBBY, T + "a")]["begin"].startswith(in_an_hour.strftime("%Y-%m-%d %H:%M"))
    assert shown[(LOBBY, T + "a")]["begin"].endswith("(in 60 min)")
    assert shown[(LOBBY, T + "a")]["payload"] == '{"note":"<i>x</i>"}'
    assert shown[("kiosk-7", T + "b")]["begin"] == "none"
    assert browser.evaluate("document.querySelectorAll('main em, main i').length") == 0

    # Two entries a page: the five rows come in three pages that cross from one index to
    # the next (parked, the due sets of two profiles, leases), in the same order.
    walked = []
    for number in (1, 2, 3):
        status, body = http(port, f"{PAGE}?app={APP_ID}&size=2&page={number}", LOGIN)
        assert status == 200
        walked += [(r["scope"], r["identifier"]) for r in rows(body.decode())]
    assert walked == [(r["scope"], r["identifier"]) for r in rows(dom)]

    anonymous = chromium(tmp_path, f"http://127.0.0.1:{port}{PAGE}?app={APP_ID}", "--dump-dom")
    # Refused (401): Chromium renders nothing of the page.
    assert "Pending requests" not in anonymous and T not in anonymous and "lobby" not in anonymous

    shot = tmp_path / "pending.png"
    chromium(
        tmp_path,
        logged_in(f"{PAGE}?app={APP_ID}", port),
        f"--screenshot={shot}",
        "--window-size=1600,760",
    )
    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and 10_000 < len(png) < 400_000, len(png)
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copyfile(shot, REPO / os.environ[SCREENSHOT_ENV])

    # A scope's cell links to the scope's own view: its requests, whatever they wait for.
    scope_view = browser.follow(
        "[...document.querySelectorAll('tr[data-reason] a')]"
        ".find(a => a.textContent === 'kiosk-7').click()"
    )
    assert sorted((r["scope"], r["identifier"]) for r in rows(scope_view)) == [
        ("kiosk-7", T + "b"),
        ("kiosk-7", T + "c"),
    ]

    browser.goto(logged_in(f"{PAGE}?app={APP_ID}", port))
    press = (
        "[...document.querySelectorAll('tr[data-reason]')]"
        f".find(tr => tr.cells[1].textContent === '{T}a').querySelector('button').click()"
    )
    after = browser.follow(press)
    assert f"Cancelled {T}a in scope {LOBBY}." in text(after)
    assert (LOBBY, T + "a") not in {(r["scope"], r["identifier"]) for r in rows(after)}
    assert counts(after)["not_due"] == 0
    assert record(redis_client, LOBBY, T + "a") is None
    assert redis_client.zcard(KEYS.sched(1, LOBBY)) == 0 and redis_client.zcard(KEYS.due(1)) == 0
    assert sample_app.scheduler_for(LOBBY).history()[0].state == "cancelled"


def test_pages_show_each_request_once_and_read_a_page_not_the_backlog(
    flower: int, sample_app: bg.BackgroundApp, redis_client: redis.Redis, browser: Browser
) -> None:
    """250 scopes waiting, 100 a page: Chromium follows "next" through three pages of 100,
    100 and 50 rows, no row twice, every request once. Reading a page costs Redis a number
    of reads set by the page's size, not by the backlog (INFO commandstats), and no SCAN or
    KEYS."""
    port = flower
    later = datetime.now(UTC) + timedelta(days=1)
    scopes = [f"device-{n:03d}" for n in range(250)]
    for n, scope in enumerate(scopes):
        sample_app.scheduler_for(scope).submit(
            bg.ProcessingTaskRequest(T + "a", later + timedelta(seconds=n))
        )

    dom = browser.goto(logged_in(f"{PAGE}?app={APP_ID}", port))
    assert counts(dom)["no_capable_worker"] == 250  # no worker at all
    seen, sizes = [], []
    while True:
        page = rows(dom)
        sizes.append(len(page))
        seen += [(r["scope"], r["identifier"]) for r in page]
        if 'rel="next"' not in dom:
            break
        dom = browser.follow("document.querySelector('a[rel=next]').click()")
    assert sizes == [100, 100, 50]
    assert len(seen) == len(set(seen)) == 250
    assert [scope for scope, _ in seen] == scopes  # earliest first
    assert "page 3 of 3" in text(dom)

    for size in (10, 100):
        redis_client.config_resetstat()
        assert http(port, f"{PAGE}?app={APP_ID}&page=2&size={size}", LOGIN)[0] == 200
        stats = redis_client.info("commandstats")
        reads = sum(
            stats.get(f"cmdstat_{c}", {}).get("calls", 0)
            for c in ("zrange", "zcard", "hmget", "hget")
        )
        assert reads <= 3 * size + 2 * 18, (size, reads)  # 16 due indexes, parked, leases
        assert not {"cmdstat_scan", "cmdstat_keys", "cmdstat_hscan", "cmdstat_zscan"} & set(stats)


def test_a_page_is_a_slice_of_the_indexes_laid_end_to_end() -> None:
    """Where a page falls in indexes of these sizes: empty ones passed over, a page that
    ends in one index and goes on in the next, a page past the end."""
    assert slices([0, 3, 0, 5], 0, 2) == [(1, 0, 1)]
    assert slices([0, 3, 0, 5], 2, 4) == [(1, 2, 2), (3, 0, 2)]
    assert slices([0, 3, 0, 5], 6, 4) == [(3, 3, 4)]
    assert slices([0, 3, 0, 5], 8, 4) == []
    assert slices([250] + [0] * 17, 200, 100) == [(0, 200, 249)]
