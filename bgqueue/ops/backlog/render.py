"""The backlog page as plain HTML: no script, no asset from elsewhere, a little inline CSS.

Identifiers, scopes, app ids and payloads are users' data: every one goes through `_e`
(html.escape, quotes included) or urlencode before it reaches the page.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from urllib.parse import urlencode

from bgqueue.model.counts import REASONS
from bgqueue.model.requests import Kind, requirement_names
from bgqueue.ops.backlog.listing import PER_SCOPE, Listing, Row

LABELS = {
    "no_handler": "no handler",
    "no_capable_worker": "no capable worker",
    "not_due": "not due",
    "dispatched": "dispatched",
}
MEANINGS = {
    "no_handler": "no live worker that satisfies its requirements has its handler",
    "no_capable_worker": "no live worker satisfies its requirements",
    "not_due": "a live worker can run it once its earliest-begin date has passed",
    "dispatched": "sent to a worker, not started yet",
}
PAYLOAD_SHOWN = 80  # characters of a payload's JSON in its cell (all of it, capped, on hover)
PAYLOAD_TITLE = 1000

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1d2327; background: #f6f7f7; }
header { background: #fff; border-bottom: 1px solid #dcdcde; padding: 10px 24px; }
header a, header strong { margin-right: 18px; color: #2c6e2f; text-decoration: none; }
header strong { color: #1d2327; }
main { padding: 12px 24px 32px; }
h1 { font-size: 20px; margin: 8px 0 12px; }
h1 small { font-weight: normal; color: #50575e; }
table { border-collapse: collapse; background: #fff; }
th, td { border: 1px solid #dcdcde; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f1; font-weight: 600; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.counts { margin-bottom: 10px; }
.rows { width: 100%; }
.reason { display: inline-block; padding: 0 6px; border-radius: 8px; font-size: 12px;
          white-space: nowrap; }
.no_handler { background: #fcdede; } .no_capable_worker { background: #fbe7c6; }
.not_due { background: #dcebf7; } .dispatched { background: #e4f2df; }
.late { color: #b32d2e; }
code { font-size: 12px; word-break: break-all; }
form.filter { margin: 0 0 12px; } form.filter input, form.filter select { margin-right: 10px; }
.pager { margin: 10px 0; } .pager a, .pager span { margin-right: 12px; }
.note { background: #fff8e5; border: 1px solid #f0c33c; padding: 6px 10px; }
.error { background: #fcf0f1; border: 1px solid #d63638; padding: 6px 10px; }
.muted { color: #50575e; }
button { cursor: pointer; }
"""


@dataclass(frozen=True)
class Links:
    """Where the page's links and forms go (Flower may serve under a URL prefix)."""

    page: str
    cancel: str
    flower: list[tuple[str, str]] = field(default_factory=list)  # (label, path) of Flower's

    def to(self, params: dict[str, str]) -> str:
        """The page's URL with these arguments."""
        return f"{self.page}?{urlencode(params)}" if params else self.page


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def page(listing: Listing, links: Links, xsrf_input: str, note: str = "") -> str:
    """The whole page. `xsrf_input` is the form token's hidden input (Tornado's
    `xsrf_form_html`, already escaped); `note` says what the last action did."""
    app_id = listing.query.app_id
    parts = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        f"<title>Pending requests · {_e(app_id or 'bgqueue')} · Flower</title>",
        f"<style>{STYLE}</style></head><body>",
        _navbar(links),
        "<main>",
        f"<h1>Pending requests <small>{_e(app_id) if app_id else ''}</small></h1>",
    ]
    if note:
        parts.append(f'<p class="note">{_e(note)}</p>')
    if not listing.apps:
        parts.append("<p>No app has used this broker yet: nothing waits.</p>")
        return "".join([*parts, "</main></body></html>"])
    parts += [_filter_form(listing, links), _counts(listing, links), _served(listing)]
    if listing.error:
        parts.append(f'<p class="error">{_e(listing.error)}</p>')
    else:
        parts += [_pager(listing, links), _rows(listing, links, xsrf_input), _cut(listing)]
        parts.append(_pager(listing, links))
    return "".join([*parts, "</main></body></html>"])


def _navbar(links: Links) -> str:
    flower = "".join(f'<a href="{_e(path)}">{_e(label)}</a>' for label, path in links.flower)
    return f"<header>Flower: {flower}<strong>Pending</strong></header>"


def _filter_form(listing: Listing, links: Links) -> str:
    query = listing.query
    options = "".join(
        f'<option value="{_e(a)}"{" selected" if a == query.app_id else ""}>{_e(a)}</option>'
        for a in listing.apps
    )
    reasons = '<option value="">every reason</option>' + "".join(
        f'<option value="{r}"{" selected" if r == query.reason else ""}>{LABELS[r]}</option>'
        for r in REASONS
    )
    return (
        f'<form class="filter" method="get" action="{_e(links.page)}">'
        f'<label>App <select name="app">{options}</select></label>'
        f'<label>Reason <select name="reason">{reasons}</select></label>'
        f'<label>Scope <input name="scope" value="{_e(query.scope)}" placeholder="every scope" '
        f'size="16"></label><label>Per page <input name="size" type="number" min="1" '
        f'max="500" value="{query.size}" style="width: 5em"></label>'
        "<button>Show</button></form>"
    )


def _counts(listing: Listing, links: Links) -> str:
    """Requests waiting by reason and kind, from the app's counts (not from the rows)."""
    query = listing.query
    head = "".join(f"<th>{_e(kind)}</th>" for kind in Kind)
    body = []
    for reason in REASONS:
        cells = "".join(f'<td class="n">{listing.counts[(k, reason)]:,}</td>' for k in Kind)
        total = sum(listing.counts[(k, reason)] for k in Kind)
        link = links.to(query.params(reason=reason, page=1))
        body.append(
            f'<tr><th><a href="{_e(link)}"><span class="reason {reason}">{LABELS[reason]}'
            f'</span></a> <span class="muted">{MEANINGS[reason]}</span></th>{cells}'
            f'<td class="n"><b>{total:,}</b></td></tr>'
        )
    sent = sum(n for (_, reason), n in listing.counts.items() if reason == "dispatched")
    waiting = sum(listing.counts.values()) - sent
    every = links.to(query.params(reason="", page=1))
    return (
        f'<table class="counts"><tr><th>{waiting:,} waiting, {sent:,} dispatched (<a '
        f'href="{_e(every)}">every reason</a>)</th>{head}<th>total</th></tr>{"".join(body)}'
        "</table>"
    )


def _served(listing: Listing) -> str:
    """What live workers can run, as the largest requirement sets they satisfy (a worker
    that satisfies a set satisfies every smaller one)."""
    names = [" + ".join(requirement_names(p)) or "no requirement" for p in _largest(listing.served)]
    served = "; ".join(names) if names else "nothing (no live worker)"
    return f'<p class="muted">Live workers satisfy at most: {_e(served)}.</p>'


def _largest(served: set[int]) -> list[int]:
    """The profiles of `served` that no other profile of it includes."""

    def includes(big: int, small: int) -> bool:
        return ((big & 3) | (small & 3)) == (big & 3) and (big >> 2) >= (small >> 2)

    return [p for p in sorted(served) if not any(q != p and includes(q, p) for q in served)]


def _pager(listing: Listing, links: Links) -> str:
    query = listing.query
    if not listing.total:
        return ""
    first = (query.page - 1) * query.size + 1
    last = min(query.page * query.size, listing.total)
    what = "requests" if query.scope else "entries"
    shown = (
        f"<span>{what} {first:,}–{last:,} of {listing.total:,}, page {query.page:,} of "
        f"{listing.pages:,}</span>"
        if first <= listing.total
        else f"<span>page {query.page:,} is past the last ({listing.pages:,})</span>"
    )
    steps = [("first", 1), ("previous", query.page - 1), ("next", query.page + 1)]
    steps.append(("last", listing.pages))
    nav = "".join(
        f'<a rel="{name}" href="{_e(links.to(query.params(page=number)))}">{name}</a>'
        if 1 <= number <= listing.pages and number != query.page
        else f'<span class="muted">{name}</span>'
        for name, number in steps
    )
    return f'<div class="pager">{shown}{nav}</div>'


def _rows(listing: Listing, links: Links, xsrf_input: str) -> str:
    columns = ["scope", "identifier", "kind", "waits because", "earliest begin", "requires"]
    columns += ["attempts", "pending since", "payload", ""]
    head = "".join(f"<th>{name}</th>" for name in columns)
    if not listing.rows:
        empty = '<tr><td colspan="10" class="muted">Nothing waits here.</td></tr>'
        return f'<table class="rows"><thead><tr>{head}</tr></thead><tbody>{empty}</tbody></table>'
    back = "".join(
        f'<input type="hidden" name="{name}" value="{_e(value)}">'
        for name, value in listing.query.params().items()
    )
    body = "".join(_row(row, listing, links, xsrf_input + back) for row in listing.rows)
    return f'<table class="rows"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _row(row: Row, listing: Listing, links: Links, hidden: str) -> str:
    now = listing.now
    scope = links.to(listing.query.params(scope=row.scope, reason="", page=1))
    begin = _moment(row.earliest_ms, now) if row.earliest_ms else "none"
    if row.simulated:
        begin += " (launch simulated: due now)"
    late = ' class="late"' if row.reason == "not_due" and 0 < row.earliest_ms <= now else ""
    payload = row.payload if row.payload != "null" else ""
    cut = payload[:PAYLOAD_SHOWN] + ("…" if len(payload) > PAYLOAD_SHOWN else "")
    cancel = (
        f'<form method="post" action="{_e(links.cancel)}">{hidden}'
        f'<input type="hidden" name="target_scope" value="{_e(row.scope)}">'
        f'<input type="hidden" name="target_identifier" value="{_e(row.identifier)}">'
        "<button>Cancel</button></form>"
    )
    cells = [
        f'<a href="{_e(scope)}" title="every request of this scope">{_e(row.scope)}</a>',
        _e(row.identifier),
        _e(row.kind),
        f'<span class="reason {row.reason}">{LABELS[row.reason]}</span>',
        f"<span{late}>{begin}</span>",
        _e(", ".join(row.requirements) or "none"),
        f"{row.attempts}",
        _moment(row.since_ms, now) if row.since_ms else "",
        f'<code title="{_e(payload[:PAYLOAD_TITLE])}">{_e(cut)}</code>',
        cancel,
    ]
    tds = "".join(
        f'<td class="n">{cell}</td>' if i == 6 else f"<td>{cell}</td>"
        for i, cell in enumerate(cells)
    )
    return f'<tr data-reason="{row.reason}">{tds}</tr>'


def _cut(listing: Listing) -> str:
    notes = [
        f"scope {_e(scope)} has {more:,} more request(s) needing "
        f"{_e(' + '.join(requirement_names(profile)) or 'nothing')} than an entry shows "
        f"({PER_SCOPE}); its scope view lists them"
        for scope, profile, more in listing.cut
    ]
    if listing.moved:
        notes.append(
            f"{listing.moved:,} request(s) moved (were claimed, cancelled or replaced) while "
            "this page was read, or hold an unreadable record: reload to see where they are"
        )
    return "".join(f'<p class="muted">{note}</p>' for note in notes)


def _moment(ms: int, now: int) -> str:
    """An absolute UTC time and how far it is from Redis's now: '… (in 59 min)'."""
    when = datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    delta = (ms - now) / 1000
    return f"{when} ({'in ' if delta > 0 else ''}{_span(abs(delta))}{'' if delta > 0 else ' ago'})"


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"
