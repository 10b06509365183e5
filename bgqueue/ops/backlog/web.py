"""The backlog page's handlers, served by Flower's own Tornado application.

`install` runs in the `bgqueue flower` process before Flower starts. Flower builds its
application from the list `flower.urls.handlers`, so the page's two routes go into that
list ahead of Flower's catch-all 404 (Flower then applies its `--url-prefix` to them as to
its own), and Flower's navbar template gets a "Pending" link after "Broker".

The handlers are Flower's `BaseHandler`s, so the page has Flower's login and nothing else:
`@web.authenticated` asks Flower's `get_current_user`, which answers 401 without the basic
auth login. The cancel form is a POST, checked before anything runs (`check_xsrf_cookie`):
the login, then Flower's own refusal of cross-site and foreign-origin requests, then
Tornado's token, which this page puts in its form and in a cookie (`xsrf_cookies` is on in
Flower). A page elsewhere can neither make the browser post here with its remembered login
nor read the token.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import redis
from flower import urls
from flower.views import BaseHandler
from tornado import template, web
from tornado.ioloop import IOLoop
from tornado.routing import URLSpec

from bgqueue.errors import BackgroundTaskError, ParameterError, ServiceError
from bgqueue.model.requests import check_name
from bgqueue.ops.backlog import render
from bgqueue.ops.backlog.listing import Backlog, Query

PAGE = "/bgqueue/pending"
CANCEL = "/bgqueue/pending/cancel"
PAGE_NAME = "bgqueue-pending"
CANCEL_NAME = "bgqueue-pending-cancel"
FLOWER_PAGES = (("Workers", "workers"), ("Tasks", "tasks"), ("Broker", "broker"))
NAV_LINK = (
    '\n        <li class="nav-item">\n          <a class="nav-link" '
    f"href=\"{{{{ reverse_url('{PAGE_NAME}') }}}}\">Pending</a>\n        </li>"
)
# The page runs no script and loads nothing: its CSS is inline, its forms post to itself.
POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)

T = TypeVar("T")


def install(broker_url: str) -> None:
    """Add the page's routes and navbar link to Flower (before it starts; once)."""
    if any(getattr(spec, "name", None) == PAGE_NAME for spec in urls.handlers):
        return
    backlog = {"backlog": Backlog(broker_url)}
    routes = [
        URLSpec(PAGE, PendingPage, backlog, name=PAGE_NAME),
        URLSpec(CANCEL, CancelAction, backlog, name=CANCEL_NAME),
    ]
    catch_all = next(
        (i for i, spec in enumerate(urls.handlers) if _pattern(spec) in (".*", ".*$")),
        len(urls.handlers),
    )
    urls.handlers[catch_all:catch_all] = routes
    urls.settings["template_loader"] = NavbarLoader(urls.settings["template_path"])


def _pattern(spec: Any) -> str:
    return str(spec.regex.pattern if isinstance(spec, URLSpec) else spec[0])


def with_link(navbar: str) -> str:
    """Flower's navbar template with the page's link after the Broker item; unchanged if
    it has no such item (another Flower version: the page is still at /bgqueue/pending)."""
    broker = navbar.find("reverse_url('broker')")
    end = navbar.find("</li>", broker) if broker >= 0 else -1
    if end < 0:
        return navbar
    end += len("</li>")
    return navbar[:end] + NAV_LINK + navbar[end:]


class NavbarLoader(template.Loader):
    """Flower's templates, read from Flower's template directory as Flower reads them,
    with `with_link` applied to its navbar."""

    def _create_template(self, name: str) -> template.Template:
        if name != "navbar.html":
            return super()._create_template(name)
        text = (Path(self.root) / name).read_text(encoding="utf-8")
        return template.Template(with_link(text), name=name, loader=self)


class _Handler(BaseHandler):  # type: ignore[misc]  # flower is untyped
    """Flower's handler (its login, URL prefix and error pages) with the backlog."""

    def initialize(self, backlog: Backlog) -> None:
        self.backlog = backlog

    def links(self) -> render.Links:
        return render.Links(
            self.reverse_url(PAGE_NAME),
            self.reverse_url(CANCEL_NAME),
            [(label, self.reverse_url(name)) for label, name in FLOWER_PAGES],
        )

    async def off_loop(self, call: Callable[..., T], *args: Any) -> T:
        """Run a blocking Redis call in Flower's thread pool, so Flower's event loop (its
        events, its other pages) never waits on it; broker trouble is a 503."""
        try:
            return await IOLoop.current().run_in_executor(None, call, *args)
        except (ServiceError, redis.RedisError, OSError) as exc:
            raise web.HTTPError(503, "the broker did not answer: %s", type(exc).__name__) from exc
        except BackgroundTaskError as exc:
            raise web.HTTPError(400, "%s", exc) from exc


def _arguments(source: dict[str, list[bytes]]) -> dict[str, str]:
    """URL or form arguments, the last value of each, as text."""
    return {name: values[-1].decode(errors="replace") for name, values in source.items()}


def _query(args: dict[str, str]) -> Query:
    try:
        return Query.parse(args)
    except ParameterError as exc:
        raise web.HTTPError(400, "%s", exc) from exc


def _note(args: dict[str, str]) -> str:
    """What the cancel that redirected here did (its arguments are escaped by render)."""
    identifier, scope = args.get("id", ""), args.get("in", "")
    if args.get("done") == "cancelled":
        return f"Cancelled {identifier} in scope {scope}."
    if args.get("done") == "gone":
        return (
            f"{identifier} in scope {scope} was no longer waiting (it started, ended or was "
            "cancelled already): nothing was cancelled."
        )
    return ""


class PendingPage(_Handler):
    """GET /bgqueue/pending: the counts and one page of the listing."""

    @web.authenticated
    async def get(self) -> None:
        args = _arguments(self.request.query_arguments)
        listing = await self.off_loop(self.backlog.read, _query(args))
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("Content-Security-Policy", POLICY)
        self.finish(render.page(listing, self.links(), self.xsrf_form_html(), _note(args)))


class CancelAction(_Handler):
    """POST /bgqueue/pending/cancel: cancel one request, then back to the page (303)."""

    def check_xsrf_cookie(self) -> None:
        """Tornado calls this before any POST method: the login first (anonymous is a 401,
        as everywhere in Flower), then Flower's same-origin check, then the form's token."""
        if not self.current_user:  # Flower's get_current_user raises 401 itself
            raise web.HTTPError(401)
        super().check_xsrf_cookie()
        web.RequestHandler.check_xsrf_cookie(self)

    @web.authenticated
    async def post(self) -> None:
        args = _arguments(self.request.body_arguments)
        query = _query(args)
        try:
            if not query.app_id:
                raise ParameterError("the form names no app")
            scope = check_name(args.get("target_scope"), "scope")
            identifier = check_name(args.get("target_identifier"), "identifier")
        except ParameterError as exc:
            raise web.HTTPError(400, "%s", exc) from exc
        done = await self.off_loop(self.backlog.cancel, query.app_id, scope, identifier)
        back = {"done": "cancelled" if done else "gone", "id": identifier, "in": scope}
        self.redirect(self.links().to({**query.params(), **back}), status=303)
