"""The dashboard: a small Starlette app over `AsyncStats` and the operator operations.

Pages (server-rendered HTML, every value escaped, no build step, nothing fetched from
the internet):

- `/` overview: backends (URLs redacted), workers and their health, queue depths with a
  purge button, counters per task, a throughput chart (inline SVG) and recent failures;
- `/tasks` records filtered by status, name and age, or found by uuid (or a prefix of it);
- `/tasks/{uuid}` one record: arguments, result, error with traceback, timings, attempts,
  with retry / cancel buttons.

Every page polls its JSON twin under `/api/...` every few seconds (not while its tab is
hidden) and swaps in the fresh HTML fragments it carries (`html`), next to the facts
themselves; `tests/browser` checks this in a real Chromium. Actions are POSTs:
`/tasks/{uuid}/retry`, `/tasks/{uuid}/cancel`, `/queues/{queue}/purge` (forms, answered
with a redirect) and the same under `/api/` (answered with JSON). A POST from another
origin is refused (403): it needs an Origin (or Referer) naming this host, unless it
carries `Authorization: Bearer`, which a browser never adds by itself.

Auth is optional: a token (`Authorization: Bearer <token>`, or `?token=<token>` once,
which sets an HttpOnly cookie) and/or HTTP basic credentials.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import hmac
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from html import escape
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

import msgspec

from qtasks.cli import operations
from qtasks.message import DeadLetter, Task, TaskStatusEnum
from qtasks.stats import AsyncStats, StatsNotSupported
from qtasks.stats.report import AppStats, TaskStats, WorkerStats, dead_letter_data
from qtasks.urls import redact_url
from qtasks.web import INSTALL_HINT

try:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, RedirectResponse, Response
    from starlette.routing import Route
    from starlette.types import ASGIApp, Receive, Scope, Send
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    from qtasks.errors import ConfigurationError

    raise ConfigurationError(INSTALL_HINT) from exc

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks
    from qtasks.interfaces import QueueStats
    from qtasks.sync import QueueTasks

REFRESH_SECONDS = 3
"""How often a page asks its JSON endpoint for fresh facts."""
SESSION_COOKIE = "qtasks_session"
LIST_LIMIT = 100
"""Records a task list shows at most."""
CHART_SAMPLES = 60
"""Throughput samples kept for the chart (one per poll, at most one a second)."""
STATUS_CHOICES = ("all", *(s.value for s in TaskStatusEnum))
SINCE_CHOICES = {"": "any time", "300": "last 5 min", "3600": "last hour", "86400": "last day"}

_STYLE = """
body{font-family:system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:.6rem 1.5rem;display:flex;gap:1.2rem;
align-items:center;flex-wrap:wrap}
header a{color:#cfe0ff;text-decoration:none}header b{font-size:1.1rem}
main{padding:1rem 1.5rem}h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:1.5rem}
table{border-collapse:collapse;margin:.4rem 0 1rem;background:#fff}
td,th{padding:.3rem .7rem;border-bottom:1px solid #e3e6eb;text-align:left;vertical-align:top}
th{background:#eef0f4;font-weight:600}.num{text-align:right}
pre{background:#fff;border:1px solid #e3e6eb;padding:.8rem;overflow:auto}
.error,.lost,.cancel{color:#b00020}.success,.alive{color:#05782d}.process,.retry{color:#a65f00}
.muted{color:#6b7280}#live-status{margin-left:auto;font-size:.85rem;color:#9aa4b5}
form.inline{display:inline}button{cursor:pointer}.flash{background:#fff7d6;padding:.5rem}
svg{background:#fff;border:1px solid #e3e6eb}
.when,td a code{white-space:nowrap}
"""

_SCRIPT = """
(function(){
  var src=document.body.getAttribute('data-live');
  var box=document.getElementById('live-status');
  if(!src){return;}
  var shown={};
  box.textContent='live \\u00b7 every '+(REFRESH_MS/1000)+'s';
  async function tick(){
    try{
      var r=await fetch(src,{headers:{'Accept':'application/json'},credentials:'same-origin'});
      if(!r.ok){throw new Error('HTTP '+r.status);}
      var data=await r.json();var html=data.html||{};
      for(var key in html){
        var el=document.getElementById(key);
        // An unchanged fragment is left alone: no flicker, a text selection survives.
        if(el&&shown[key]!==html[key]){el.innerHTML=html[key];shown[key]=html[key];}
      }
      box.textContent='live \\u00b7 '+new Date().toLocaleTimeString();
    }catch(e){box.textContent='live updates paused ('+e.message+')';}
  }
  // The next poll is planned when this one ends, so a slow server never gets a pile of
  // them; a hidden tab does not poll at all and catches up as soon as it is shown.
  async function loop(){
    if(!document.hidden){await tick();}
    setTimeout(loop,REFRESH_MS);
  }
  document.addEventListener('visibilitychange',function(){if(!document.hidden){tick();}});
  setTimeout(loop,REFRESH_MS);
})();
"""


@dataclasses.dataclass(frozen=True)
class WebAuth:
    """Who may use the dashboard: None for both means anyone who can reach it."""

    token: str | None = None
    basic: tuple[str, str] | None = None
    """(user, password) for HTTP basic auth."""

    @property
    def enabled(self) -> bool:
        return self.token is not None or self.basic is not None


# -- small HTML helpers -----------------------------------------------------------------


def _when(ts: float | None) -> str:
    """A UTC time as HTML, kept on one line (a date split from its time reads badly)."""
    if ts is None:
        return "-"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))
    return f"<span class='when'>{stamp} UTC</span>"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 0.001:
        return f"{value * 1_000_000:.0f}µs"
    return f"{value * 1000:.1f}ms" if value < 1 else f"{value:.2f}s"


def _opt(value: object) -> str:
    return "-" if value is None else escape(str(value))


def _json_text(value: Any) -> str:
    try:
        return msgspec.json.encode(value, enc_hook=repr).decode()
    except (TypeError, ValueError):
        return repr(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> str:
    """A table of already-escaped cells; headers starting with '#' are right-aligned."""
    if not rows:
        return f"<p class='muted'>{escape(empty)}</p>"
    aligns = ["num" if h.startswith("#") else "" for h in headers]
    head = "".join(
        f"<th class='{a}'>{escape(h.lstrip('#'))}</th>"
        for h, a in zip(headers, aligns, strict=True)
    )
    body = "".join(
        "<tr>"
        + "".join(f"<td class='{a}'>{c}</td>" for c, a in zip(row, aligns, strict=True))
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _status(value: str) -> str:
    return f"<span class='{escape(value)}'>{escape(value)}</span>"


def _task_link(record: Task) -> str:
    uuid = escape(str(record.uuid))
    return f"<a href='/tasks/{uuid}'><code>{uuid}</code></a>"


def _post_button(action: str, label: str, confirm: str | None = None) -> str:
    check = f" onsubmit=\"return confirm('{escape(confirm)}')\"" if confirm else ""
    return (
        f"<form class='inline' method='post' action='{escape(action)}'{check}>"
        f"<button name='action' value='{escape(label.lower())}'>{escape(label)}</button></form>"
    )


def _page(title: str, sections: dict[str, str], *, live: str | None = None, flash: str = "") -> str:
    live_attr = f" data-live='{escape(live)}'" if live else ""
    body = "".join(f"<div id='{escape(k)}'>{v}</div>" for k, v in sections.items())
    note = f"<p class='flash'>{escape(flash)}</p>" if flash else ""
    script = _SCRIPT.replace("REFRESH_MS", str(REFRESH_SECONDS * 1000))
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{escape(title)} · qtasks</title><style>{_STYLE}</style></head>"
        f"<body{live_attr}><header><b>qtasks</b><a href='/'>overview</a>"
        "<a href='/tasks'>tasks</a><a href='/tasks?status=error'>failed</a>"
        "<a href='/dead-letters'>dead letters</a>"
        "<form class='inline' method='get' action='/tasks'>"
        "<input name='uuid' placeholder='task uuid' size='36' aria-label='task uuid'> "
        "<button>find</button></form><span id='live-status'></span></header>"
        f"<main><h1>{escape(title)}</h1>{note}{body}</main><script>{script}</script>"
        "</body></html>"
    )


# -- throughput -------------------------------------------------------------------------


class Throughput:
    """Counter samples taken as the overview is polled: the chart's time axis."""

    def __init__(self, size: int = CHART_SAMPLES) -> None:
        self.samples: deque[tuple[float, int, int]] = deque(maxlen=size)

    def add(self, now: float, tasks: Sequence[TaskStats]) -> None:
        """Record the summed processed / failed counters, at most once a second."""
        if self.samples and now - self.samples[-1][0] < 1.0:
            return
        self.samples.append((now, sum(t.processed for t in tasks), sum(t.failed for t in tasks)))

    def rates(self) -> list[tuple[float, float, float]]:
        """(time, processed per second, failed per second) between consecutive samples."""
        out = []
        pairs = zip(list(self.samples), list(self.samples)[1:], strict=False)
        for (t0, p0, f0), (t1, p1, f1) in pairs:
            span = max(t1 - t0, 1e-6)
            # A restarted worker resets its counters; a drop is not negative throughput.
            out.append((t1, max(p1 - p0, 0) / span, max(f1 - f0, 0) / span))
        return out


def chart_svg(rates: Sequence[tuple[float, float, float]], width: int = 600) -> str:
    """Tasks per second over time as bars (failures in red), an inline SVG.

    Every sample has a slot of the same width, the newest at the right edge: the chart
    fills from the right as samples come in, instead of one bar as wide as the chart.
    """
    height, pad = 120, 18
    if not rates:
        return (
            "<p class='muted'>throughput appears after a few refreshes "
            f"(every {REFRESH_SECONDS}s)</p>"
        )
    rates = rates[-(CHART_SAMPLES - 1) :]
    peak = max(max(r[1] for r in rates), 1e-9)
    bar = (width - 2) / (CHART_SAMPLES - 1)
    first = CHART_SAMPLES - 1 - len(rates)
    parts = [
        f"<svg role='img' aria-label='throughput' width='{width}' height='{height + pad}' "
        f"viewBox='0 0 {width} {height + pad}' xmlns='http://www.w3.org/2000/svg'>"
    ]
    for i, (_, done, failed) in enumerate(rates, start=first):
        x = 1 + i * bar
        h = done / peak * (height - 4)
        hf = failed / peak * (height - 4)
        parts.append(
            f"<rect x='{x:.1f}' y='{height - h:.1f}' width='{max(bar - 1, 1):.1f}' "
            f"height='{h:.1f}' fill='#3b82f6'><title>{done:.1f}/s</title></rect>"
        )
        if hf > 0:
            parts.append(
                f"<rect x='{x:.1f}' y='{height - hf:.1f}' width='{max(bar - 1, 1):.1f}' "
                f"height='{hf:.1f}' fill='#dc2626'><title>{failed:.1f} failed/s</title></rect>"
            )
    samples = f"{len(rates)} sample" + ("" if len(rates) == 1 else "s")
    parts.append(
        f"<line x1='1' y1='{height}' x2='{width - 1}' y2='{height}' stroke='#e3e6eb'/>"
        f"<text x='4' y='{height + 13}' font-size='11' fill='#6b7280'>peak {peak:.1f} tasks/s "
        f"· last {rates[-1][1]:.1f}/s · {samples}</text></svg>"
    )
    return "".join(parts)


# -- fragments --------------------------------------------------------------------------


def workers_html(workers: Sequence[WorkerStats], now: float) -> str:
    return _table(
        [
            "id",
            "status",
            "host",
            "#pid",
            "queues",
            "#slots",
            "#processed",
            "#running",
            "started",
            "#heartbeat",
        ],
        [
            [
                f"<code>{escape(w.id)}</code>",
                _status(w.status),
                _opt(w.host),
                _opt(w.pid),
                escape(",".join(w.queues)),
                _opt(w.concurrency),
                str(w.processed),
                str(w.running),
                _when(w.started_at),
                "-" if w.heartbeat is None else f"{max(now - w.heartbeat, 0):.0f}s ago",
            ]
            for w in workers
        ],
        "no workers registered: start one with qtasks -A module:app run",
    )


def queues_html(queues: Sequence[QueueStats]) -> str:
    rows = []
    for q in queues:
        by_priority = (
            "-" if not q.by_priority else " ".join(f"{p}:{n}" for p, n in q.by_priority.items())
        )
        purge = _post_button(
            f"/queues/{q.queue}/purge", "Purge", f"Drop every queued task of {q.queue}?"
        )
        rows.append(
            [
                escape(q.queue),
                str(q.total),
                _opt(q.ready),
                _opt(q.delayed),
                _opt(q.in_flight),
                (
                    f"<a href='/dead-letters?{urlencode({'queue': q.queue})}'>{q.dead_lettered}</a>"
                    if q.dead_lettered
                    else _opt(q.dead_lettered)
                ),
                escape(by_priority),
                purge,
            ]
        )
    return _table(
        [
            "queue",
            "#total",
            "#ready",
            "#delayed",
            "#in flight",
            "#dead-lettered",
            "ready by priority",
            "",
        ],
        rows,
        "no queues",
    )


def dead_letters_html(letters: Sequence[DeadLetter], now: float) -> str:
    """The dead letters table: why each was set aside, with Retry and Drop buttons."""
    rows = []
    for x in letters:
        uuid = escape(x.uuid)
        first_line = x.detail.strip().splitlines()[0] if x.detail.strip() else "-"
        actions = _post_button(f"/dead-letters/{x.uuid}/retry", "Retry") + _post_button(
            f"/dead-letters/{x.uuid}/drop", "Drop", f"Drop dead letter {x.uuid} for good?"
        )
        rows.append(
            [
                f"<a href='/tasks/{uuid}'><code>{uuid}</code></a>",
                escape(x.name or "-"),
                escape(x.queue),
                f"<span class='error'>{escape(x.reason)}</span>",
                escape(f"{max(now - x.dead_at, 0.0):.0f}s ago"),
                str(x.delivery_count),
                f"<span title='{escape(x.detail)}'>{escape(first_line)}</span>",
                actions,
            ]
        )
    return _table(
        ["uuid", "name", "queue", "reason", "dead since", "#runs", "detail", ""],
        rows,
        "no dead letters",
    )


def dead_queues_html(queues: Sequence[QueueStats]) -> str:
    """One Purge button per queue that holds dead letters."""
    buttons = [
        _post_button(
            f"/queues/{q.queue}/dead-letters/purge",
            f"Purge dead letters of {q.queue}",
            f"Drop every dead letter of {q.queue} for good?",
        )
        for q in queues
        if q.dead_lettered
    ]
    return " ".join(buttons)


def tasks_html(tasks: Sequence[TaskStats]) -> str:
    return _table(
        [
            "name",
            "queue",
            "#processed",
            "#succeeded",
            "#failed",
            "#retried",
            "#cancelled",
            "#running",
            "#mean",
            "#p95",
            "#wait p95",
        ],
        [
            [
                f"<a href='/tasks?{escape(urlencode({'name': t.name}))}'>{escape(t.name)}</a>",
                _opt(t.queue),
                str(t.processed),
                str(t.succeeded),
                str(t.failed),
                str(t.retried),
                str(t.cancelled),
                str(t.running),
                _seconds(t.duration_mean_seconds),
                _seconds(t.duration_p95_seconds),
                _seconds(t.queue_wait_p95_seconds),
            ]
            for t in tasks
        ],
        "no tasks registered",
    )


def records_html(records: Sequence[Task], empty: str = "no tasks match") -> str:
    return _table(
        ["uuid", "name", "status", "#attempts", "created", "finished", "#duration", "error"],
        [
            [
                _task_link(r),
                escape(r.name),
                _status(r.status.value),
                str(r.attempts),
                _when(r.created_at),
                _when(r.finished_at),
                _seconds(r.duration_seconds),
                escape(f"{r.error_type}: {r.error_message}" if r.error_type else ""),
            ]
            for r in records
        ],
        empty,
    )


def summary_html(app: AppStats, urls: dict[str, str]) -> str:
    wiring = " · ".join(
        f"{escape(part)} <code>{escape(url)}</code>" for part, url in urls.items() if url
    )
    alive = f"{app.workers_alive} worker{'' if app.workers_alive == 1 else 's'} alive"
    return (
        f"<p>app <b>{escape(app.name)}</b> · broker {escape(app.broker)} · storage "
        f"{escape(app.storage)} · <span class='alive'>{alive}</span>"
        f", <span class='{'lost' if app.workers_lost else 'muted'}'>{app.workers_lost} lost"
        f"</span></p><p class='muted'>{wiring}</p>"
    )


def record_html(record: Task) -> str:
    wait = (
        None
        if record.started_at is None or not record.created_at
        else max(record.started_at - record.created_at, 0.0)
    )
    rows = [
        ("uuid", f"<code>{escape(str(record.uuid))}</code>"),
        (
            "name",
            f"<a href='/tasks?{escape(urlencode({'name': record.name}))}'>"
            f"{escape(record.name)}</a>",
        ),
        ("status", _status(record.status.value)),
        ("queue", escape(record.queue)),
        ("priority", str(record.priority)),
        ("args", f"<code>{escape(_json_text(record.args))}</code>"),
        ("kwargs", f"<code>{escape(_json_text(record.kwargs))}</code>"),
        ("attempts", str(record.attempts)),
        ("created", _when(record.created_at)),
        ("eta", _when(record.eta)),
        ("started", _when(record.started_at)),
        ("finished", _when(record.finished_at)),
        ("queue wait", _seconds(wait)),
        ("duration", _seconds(record.duration_seconds)),
    ]
    if record.status is TaskStatusEnum.SUCCESS:
        rows.append(("result", f"<pre>{escape(_json_text(record.returning))}</pre>"))
    if record.error_type is not None:
        rows.append(
            (
                "error",
                f"<span class='error'>{escape(record.error_type)}: "
                f"{escape(record.error_message or '')}</span>",
            )
        )
    body = _table(["field", "value"], rows, "")
    uuid = str(record.uuid)
    buttons = []
    if record.status in (TaskStatusEnum.ERROR, TaskStatusEnum.CANCEL):
        buttons.append(_post_button(f"/tasks/{uuid}/retry", "Retry"))
    if not record.is_final:
        buttons.append(_post_button(f"/tasks/{uuid}/cancel", "Cancel", "Cancel this task?"))
    body += "<p>" + " ".join(buttons) + "</p>" if buttons else ""
    if record.traceback:
        body += f"<h2>Traceback</h2><pre class='traceback'>{escape(record.traceback)}</pre>"
    return body


def _filters_html(status: str, name: str, since: str, uuid: str) -> str:
    status_opts = "".join(
        f"<option{' selected' if s == status else ''}>{escape(s)}</option>" for s in STATUS_CHOICES
    )
    since_opts = "".join(
        f"<option value='{escape(v)}'{' selected' if v == since else ''}>{escape(label)}</option>"
        for v, label in SINCE_CHOICES.items()
    )
    return (
        "<form method='get' action='/tasks'>"
        f"<label>status <select name='status'>{status_opts}</select></label> "
        f"<label>name <input name='name' value='{escape(name)}'></label> "
        f"<label>time <select name='since'>{since_opts}</select></label> "
        f"<label>uuid <input name='uuid' value='{escape(uuid)}' size='36'></label> "
        "<button>filter</button></form>"
    )


# -- JSON -------------------------------------------------------------------------------


def _json(value: Any, status_code: int = 200) -> Response:
    return Response(
        msgspec.json.encode(value, enc_hook=repr),
        status_code=status_code,
        media_type="application/json",
    )


def _error(message: str, status_code: int, *, api: bool) -> Response:
    if api:
        return _json({"error": message}, status_code)
    return HTMLResponse(_page("error", {"message": f"<p>{escape(message)}</p>"}), status_code)


# -- auth and cross-origin checks ------------------------------------------------------


def _session_value(token: str) -> str:
    """What the cookie holds: derived from the token, never the token itself."""
    return hmac.new(token.encode(), b"qtasks-web-session", hashlib.sha256).hexdigest()


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class Guard:
    """ASGI middleware: refuses cross-origin writes, then checks token or basic auth."""

    def __init__(self, app: ASGIApp, auth: WebAuth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if request.method in _UNSAFE and not self.same_origin(request):
            response: Response = _error(
                "cross-origin request refused", 403, api=request.url.path.startswith("/api/")
            )
            await response(scope, receive, send)
            return
        if self.auth.enabled:
            refused = self.check(request)
            if refused is not None:
                await refused(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def same_origin(request: Request) -> bool:
        """True for a write this site's own pages (or a non-browser client) made."""
        if request.headers.get("authorization", "").lower().startswith("bearer "):
            return True  # a browser never adds this header to a cross-site request by itself
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return False
        origin = request.headers.get("origin") or request.headers.get("referer")
        if not origin or origin == "null":
            return False
        host = request.headers.get("host", "")
        return bool(host) and urlsplit(origin).netloc.lower() == host.lower()

    def check(self, request: Request) -> Response | None:
        """None when the request may go on; else the response refusing it."""
        token, basic = self.auth.token, self.auth.basic
        header = request.headers.get("authorization", "")
        scheme, _, credentials = header.partition(" ")
        if token is not None:
            given = request.query_params.get("token")
            if scheme.lower() == "bearer" and _same(credentials.strip(), token):
                return None
            cookie = request.cookies.get(SESSION_COOKIE)
            if cookie is not None and _same(cookie, _session_value(token)):
                return None
            if given is not None and _same(given, token):
                target = request.url.remove_query_params("token")
                response = RedirectResponse(str(target), status_code=303)
                response.set_cookie(
                    SESSION_COOKIE, _session_value(token), httponly=True, samesite="strict"
                )
                return response
        if basic is not None and scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(credentials.strip()).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                user, password = "", ""
            if _same(user, basic[0]) & _same(password, basic[1]):
                return None
        return self.refusal(request)

    def refusal(self, request: Request) -> Response:
        headers = {"WWW-Authenticate": 'Basic realm="qtasks"'} if self.auth.basic else {}
        message = "authentication required"
        if request.url.path.startswith("/api/") or self.auth.token is None:
            return Response(message, 401, headers=headers, media_type="text/plain")
        form = (
            "<form method='get'><label>token <input type='password' name='token'></label> "
            "<button>sign in</button></form>"
        )
        return HTMLResponse(_page(message, {"login": form}), 401, headers=headers)


# -- the app ----------------------------------------------------------------------------


def _async_core(app: AsyncQueueTasks | QueueTasks) -> AsyncQueueTasks:
    from qtasks.sync import QueueTasks

    return app.core if isinstance(app, QueueTasks) else app


def create_app(
    app: AsyncQueueTasks | QueueTasks,
    *,
    token: str | None = None,
    basic: tuple[str, str] | None = None,
) -> Starlette:
    """The dashboard for `app`; the app is started with the server and stopped with it."""
    core = _async_core(app)
    inspect = AsyncStats(core).inspect()
    throughput = Throughput()

    async def started() -> AsyncQueueTasks:
        await core.start()
        return core

    def urls() -> dict[str, str]:
        broker = core.broker_url or getattr(core.broker, "url", None)
        return {
            "broker": redact_url(broker) if isinstance(broker, str) else "",
            "storage": redact_url(core.storage_url) if core.storage_url else "",
        }

    # -- overview --

    async def overview_data() -> dict[str, Any]:
        await started()
        now = time.time()
        app_stats = await inspect.app_stats()
        workers = await inspect.worker_stats()
        queues = await inspect.queue_stats()
        tasks = await inspect.task_stats()
        throughput.add(now, tasks)
        rates = throughput.rates()
        try:
            failures: list[Task] | None = await inspect.recent_failures(10)
            failures_fragment = records_html(failures or [], "no failed tasks")
        except StatsNotSupported as exc:
            failures, failures_fragment = None, f"<p class='muted'>{escape(str(exc))}</p>"
        html = {
            "summary": summary_html(app_stats, urls()),
            "chart": chart_svg(rates),
            "workers": workers_html(workers, now),
            "queues": queues_html(queues),
            "tasks": tasks_html(tasks),
            "failures": failures_fragment,
        }
        return {
            "app": app_stats,
            "urls": urls(),
            "workers": workers,
            "queues": queues,
            "tasks": tasks,
            "throughput": [
                {"time": t, "per_second": p, "failed_per_second": f} for t, p, f in rates
            ],
            "failures": failures,
            "html": html,
        }

    async def overview(request: Request) -> Response:
        data = await overview_data()
        html = data["html"]
        sections = {
            "summary": html["summary"],
            "h-chart": "<h2>Throughput</h2>",
            "chart": html["chart"],
            "h-workers": "<h2>Workers</h2>",
            "workers": html["workers"],
            "h-queues": "<h2>Queues</h2>",
            "queues": html["queues"],
            "h-tasks": "<h2>Tasks</h2>",
            "tasks": html["tasks"],
            "h-failures": "<h2>Recent failures</h2>",
            "failures": html["failures"],
        }
        flash = request.query_params.get("done", "")
        return HTMLResponse(_page("overview", sections, live="/api/overview", flash=flash))

    async def api_overview(request: Request) -> Response:
        return _json(await overview_data())

    # -- task list --

    async def list_records(
        status: str, name: str, since: float | None, uuid: str
    ) -> tuple[list[Task], str | None]:
        """Matching records (latest first) and why the list may be incomplete."""
        core_ = await started()
        statuses = list(TaskStatusEnum) if status == "all" else [TaskStatusEnum(status)]
        filtered = bool(name or since or uuid)
        fetch = LIST_LIMIT * 10 if filtered else LIST_LIMIT
        found: list[Task] = []
        notes: list[str] = []
        for s in statuses:
            try:
                found += await core_.storage.recent(s, fetch)
            except NotImplementedError as exc:
                notes.append(str(exc))  # e.g. Redis lists no queued (new) tasks
        if len(notes) == len(statuses):
            return [], notes[0]
        cutoff = None if since is None else time.time() - since

        def when(r: Task) -> float:
            return r.finished_at or r.started_at or r.created_at

        out = [
            r
            for r in found
            if (not name or r.name == name)
            and (cutoff is None or when(r) >= cutoff)
            and (not uuid or str(r.uuid).startswith(uuid.lower()))
        ]
        out.sort(key=when, reverse=True)
        return out[:LIST_LIMIT], "; ".join(notes) or None

    def list_params(request: Request) -> tuple[str, str, str, str]:
        q = request.query_params
        status = q.get("status", "all").strip().lower() or "all"
        if status not in STATUS_CHOICES:
            raise ValueError(f"unknown status {status!r}; use one of {', '.join(STATUS_CHOICES)}")
        since = q.get("since", "").strip()
        if since and not since.isdigit():
            raise ValueError(f"since must be a number of seconds, got {since!r}")
        return status, q.get("name", "").strip(), since, q.get("uuid", "").strip()

    async def list_data(request: Request) -> dict[str, Any]:
        status, name, since, uuid = list_params(request)
        records, note = await list_records(status, name, float(since) if since else None, uuid)
        fragment = records_html(records) if records or not note else ""
        if records and len(records) == LIST_LIMIT:
            fragment += f"<p class='muted'>showing the latest {LIST_LIMIT}</p>"
        if note:
            fragment += f"<p class='muted'>{escape(note)}</p>"
        return {"tasks": records, "note": note, "html": {"records": fragment}}

    async def task_list(request: Request) -> Response:
        try:
            status, name, since, uuid = list_params(request)
        except ValueError as exc:
            return _error(str(exc), 400, api=False)
        if uuid:
            record = await lookup(uuid)
            if record is not None:
                return RedirectResponse(f"/tasks/{record.uuid}", status_code=303)
        data = await list_data(request)
        query = request.url.query
        sections = {
            "filters": _filters_html(status, name, since, uuid),
            "records": data["html"]["records"],
        }
        live = "/api/tasks" + (f"?{query}" if query else "")
        return HTMLResponse(_page("tasks", sections, live=live))

    async def api_tasks(request: Request) -> Response:
        try:
            return _json(await list_data(request))
        except ValueError as exc:
            return _error(str(exc), 400, api=True)

    # -- one task --

    async def lookup(uuid: str) -> Task | None:
        core_ = await started()
        try:
            return await core_.get(uuid)
        except (ValueError, TypeError):
            return None

    async def task_detail(request: Request) -> Response:
        uuid = request.path_params["uuid"]
        record = await lookup(uuid)
        if record is None:
            return _error(f"no task {uuid} (unknown or expired)", 404, api=False)
        flash = request.query_params.get("done", "")
        sections = {"record": record_html(record)}
        return HTMLResponse(
            _page(f"task {record.name}", sections, live=f"/api/tasks/{record.uuid}", flash=flash)
        )

    async def api_task(request: Request) -> Response:
        uuid = request.path_params["uuid"]
        record = await lookup(uuid)
        if record is None:
            return _error(f"no task {uuid} (unknown or expired)", 404, api=True)
        return _json({"task": record, "html": {"record": record_html(record)}})

    # -- actions --

    async def act(request: Request, action: str) -> Response:
        api = request.url.path.startswith("/api/")
        core_ = await started()
        try:
            if action == "purge":
                queue = request.path_params["queue"]
                dropped = await operations.purge(core_, [queue])
                message = f"purged {dropped} queued task(s) from {queue}"
                if api:
                    return _json({"queue": queue, "dropped": dropped})
                return RedirectResponse(f"/?{urlencode({'done': message})}", status_code=303)
            uuid = request.path_params["uuid"]
            if action == "retry":
                new = await operations.retry(core_, uuid)
                if api:
                    return _json({"retried": uuid, "task": new})
                done = urlencode({"done": f"retry of {uuid}"})
                return RedirectResponse(f"/tasks/{new.uuid}?{done}", status_code=303)
            record = await operations.cancel(core_, uuid)
            if api:
                return _json({"task": record})
            return RedirectResponse(f"/tasks/{uuid}?done=cancelled", status_code=303)
        except operations.OperationError as exc:
            return _error(str(exc), 409, api=api)

    async def retry(request: Request) -> Response:
        return await act(request, "retry")

    async def cancel(request: Request) -> Response:
        return await act(request, "cancel")

    async def purge(request: Request) -> Response:
        return await act(request, "purge")

    # -- dead letters --

    async def dead_data(request: Request) -> dict[str, Any]:
        core_ = await started()
        queue = request.query_params.get("queue", "").strip()
        queues = [queue] if queue else None
        letters = await core_.dead_letters(queues, LIST_LIMIT)
        stats = await inspect.queue_stats()
        html = {
            "letters": dead_letters_html(letters, time.time()),
            "purge": dead_queues_html([q for q in stats if not queue or q.queue == queue]),
        }
        return {"dead_letters": [dead_letter_data(x) for x in letters], "html": html}

    async def dead_letters(request: Request) -> Response:
        try:
            data = await dead_data(request)
        except NotImplementedError as exc:
            return _error(str(exc), 501, api=False)
        query = request.url.query
        live = "/api/dead-letters" + (f"?{query}" if query else "")
        flash = request.query_params.get("done", "")
        sections = {"purge": data["html"]["purge"], "letters": data["html"]["letters"]}
        return HTMLResponse(_page("dead letters", sections, live=live, flash=flash))

    async def api_dead_letters(request: Request) -> Response:
        try:
            return _json(await dead_data(request))
        except NotImplementedError as exc:
            return _error(str(exc), 501, api=True)

    async def dead_act(request: Request) -> Response:
        api = request.url.path.startswith("/api/")
        core_ = await started()
        action = request.url.path.rstrip("/").rsplit("/", 1)[1]
        try:
            if action == "purge":
                queue = request.path_params["queue"]
                done = await operations.settle_dead_letters(core_, "drop", [], [queue])
                message = f"dropped {len(done)} dead letter(s) of {queue}"
            else:
                uuid = request.path_params["uuid"]
                done = await operations.settle_dead_letters(core_, action, [uuid], None)
                verb = "sent again" if action == "retry" else "dropped"
                message = f"dead letter {uuid} {verb}"
        except operations.OperationError as exc:
            return _error(str(exc), 409, api=api)
        if api:
            return _json({"action": action, "uuids": done})
        if action == "retry":
            return RedirectResponse(f"/tasks/{done[0]}?{urlencode({'done': message})}", 303)
        return RedirectResponse(f"/dead-letters?{urlencode({'done': message})}", 303)

    # -- the other facts, as JSON --

    async def api_app(request: Request) -> Response:
        await started()
        return _json({"app": await inspect.app_stats(), "urls": urls()})

    async def api_workers(request: Request) -> Response:
        return _json({"workers": await inspect.worker_stats()})

    async def api_queues(request: Request) -> Response:
        return _json({"queues": await inspect.queue_stats()})

    @contextlib.asynccontextmanager
    async def lifespan(web: Starlette) -> AsyncIterator[None]:
        await core.start()
        try:
            yield
        finally:
            await core.stop()

    post = ["POST"]
    routes = [
        Route("/", overview),
        Route("/tasks", task_list),
        Route("/tasks/{uuid}", task_detail),
        Route("/tasks/{uuid}/retry", retry, methods=post),
        Route("/tasks/{uuid}/cancel", cancel, methods=post),
        Route("/queues/{queue}/purge", purge, methods=post),
        Route("/dead-letters", dead_letters),
        Route("/dead-letters/{uuid}/retry", dead_act, methods=post),
        Route("/dead-letters/{uuid}/drop", dead_act, methods=post),
        Route("/queues/{queue}/dead-letters/purge", dead_act, methods=post),
        Route("/api/dead-letters", api_dead_letters),
        Route("/api/dead-letters/{uuid}/retry", dead_act, methods=post),
        Route("/api/dead-letters/{uuid}/drop", dead_act, methods=post),
        Route("/api/queues/{queue}/dead-letters/purge", dead_act, methods=post),
        Route("/api/overview", api_overview),
        Route("/api/app", api_app),
        Route("/api/workers", api_workers),
        Route("/api/queues", api_queues),
        Route("/api/tasks", api_tasks),
        Route("/api/tasks/{uuid}", api_task),
        Route("/api/tasks/{uuid}/retry", retry, methods=post),
        Route("/api/tasks/{uuid}/cancel", cancel, methods=post),
        Route("/api/queues/{queue}/purge", purge, methods=post),
    ]
    auth = WebAuth(token=token, basic=basic)
    return Starlette(routes=routes, middleware=[Middleware(Guard, auth=auth)], lifespan=lifespan)
