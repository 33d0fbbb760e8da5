"""``/dashboard``: server-rendered pages over the engine's own data, refreshed live by a little JavaScript.

Every page is a Jinja2 template (autoescaped; a plain environment, not the sandbox that renders
customers' email templates: these templates are ours) with a ``live`` region that the page's
script re-fetches from ``/dashboard/live/<page>`` every ``[dashboard] refresh`` and swaps in, so the
numbers move without a reload. Assets ship in the package (``static/``): nothing is loaded from
another site, and a strict Content-Security-Policy (scripts, styles and fetches from this origin
only) keeps it that way.

Access: log in with an API key (:mod:`engine.dashboard.session`). A ``read`` key sees every page;
only an ``admin`` key may act (hold, release, retry a domain's queue), each action confirmed on a
page of its own and sent with the session's CSRF token from this origin.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlencode

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, StrictUndefined

from engine.addresses import normalize_domain
from engine.api.deps import HttpContext, context
from engine.apikeys import ApiKey
from engine.audit import Actor
from engine.dashboard import data
from engine.dashboard.session import COOKIE, COOKIE_PATH, Session, Sessions, safe_next, same_origin
from engine.errors import ValidationFailed
from engine.suppression import normalize_address
from engine.webhooks.secrets import engine_key

if TYPE_CHECKING:
    from engine.config import Settings

log = structlog.get_logger(__name__)
router = APIRouter(include_in_schema=False)

ACTIONS = {
    "hold": "Hold: queued and deferred recipients wait until released",
    "release": "Release: held recipients go back on their schedule",
    "retry": "Retry now: queued and deferred recipients become ready at once",
}
LIVE_PAGES = ("overview", "providers", "warmup", "queue")
MAX_FORM = 16 * 1024
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


# --------------------------------------------------------------------------- templates


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _pct(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value * 100:.{digits}f}%"


def _when(value: datetime | str | None) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


TEMPLATES = Environment(
    loader=PackageLoader("engine.dashboard", "templates"), autoescape=True, undefined=StrictUndefined,
    trim_blocks=True, lstrip_blocks=True,
)
TEMPLATES.filters.update(ago=_ago, num=_num, pct=_pct, when=_when)


# --------------------------------------------------------------------------- state and viewer


@dataclass
class DashboardState:
    """What the dashboard keeps per HTTP process (on ``app.state.dashboard``)."""

    settings: Settings

    @cached_property
    def sessions(self) -> Sessions:
        # Built on first use: reading (or creating) the secret key file is the first login's job.
        return Sessions(engine_key(self.settings), self.settings.dashboard.session_lifetime)

    @cached_property
    def shaping(self) -> data.ShapingView:
        return data.ShapingView(self.settings)


def state(request: Request) -> DashboardState:
    st: DashboardState = request.app.state.dashboard
    return st


@dataclass(frozen=True, slots=True)
class Viewer:
    """The person looking: the API key their session was opened with, re-checked on this request."""

    key: ApiKey
    session: Session
    csrf: str

    @property
    def admin(self) -> bool:
        return self.key.allows("admin")


async def viewer(request: Request) -> Viewer | None:
    """The logged-in viewer, or None: no cookie, a forged or expired one, or its key revoked or without ``read``."""
    st = state(request)
    session = st.sessions.open(request.cookies.get(COOKIE))
    if session is None:
        return None
    key = await context(request).apikeys.verify_digest(session.key_digest)
    if key is None or not key.allows("read"):
        return None
    structlog.contextvars.bind_contextvars(api_key=key.name)
    return Viewer(key, session, st.sessions.csrf_token(session))


def _secured(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


def render(request: Request, template: str, status: int = 200, **values: Any) -> Response:
    ctx = context(request)
    values.setdefault("viewer", None)
    values.setdefault("page", "")
    values.setdefault("notice", None)
    values.setdefault("now", datetime.now(UTC))
    html = TEMPLATES.get_template(template).render(refresh=ctx.settings.dashboard.refresh, **values)
    return _secured(HTMLResponse(html, status_code=status))


def to_login(request: Request) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return _secured(RedirectResponse(f"{COOKIE_PATH}/login?next={quote(target, safe='')}", status_code=303))


def refused(request: Request, status: int, why: str, v: Viewer | None = None) -> Response:
    log.warning("dashboard_refused", status=status, reason=why, client=request.client.host if request.client else None)
    return render(request, "refused.html", status=status, why=why, viewer=v)


async def form(request: Request) -> dict[str, str]:
    """A urlencoded form body, first value of each field (no multipart: the dashboard posts none)."""
    body = await request.body()
    if len(body) > MAX_FORM:
        raise ValidationFailed("form too large", "body")
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}


async def checked_post(request: Request) -> tuple[Viewer | None, dict[str, str], Response | None]:
    """A state-changing POST: same origin, logged in, CSRF token right. Returns the refusal, if any."""
    ctx = context(request)
    if not same_origin(request.headers, ctx.settings.http.public_url):
        return None, {}, refused(request, 403, "This request did not come from a page of this dashboard (Origin check).")
    v = await viewer(request)
    if v is None:
        return None, {}, to_login(request)
    fields = await form(request)
    if not state(request).sessions.csrf_ok(v.session, fields.get("csrf")):
        return v, fields, refused(request, 403, "The form's CSRF token is missing or wrong: reload the page and try again.", v)
    return v, fields, None


# --------------------------------------------------------------------------- login and logout


@router.get("/dashboard/login")
async def login_page(request: Request, next: str | None = None) -> Response:
    if await viewer(request) is not None:
        return _secured(RedirectResponse(safe_next(next), status_code=303))
    return render(request, "login.html", next=safe_next(next), error=None)


@router.post("/dashboard/login")
async def login(request: Request) -> Response:
    ctx = context(request)
    if not same_origin(request.headers, ctx.settings.http.public_url):
        return refused(request, 403, "This login did not come from the dashboard's own login page (Origin check).")
    fields = await form(request)
    target = safe_next(fields.get("next"))
    secret = fields.get("key", "").strip()
    key = await ctx.apikeys.verify(secret) if secret else None
    error = None
    if key is None:
        error = "Invalid or revoked API key."
    elif not key.allows("read"):
        error = "This API key lacks the 'read' scope the dashboard needs."
    if key is None or error is not None:
        # Failed logins go through the same key check as the API; a per-IP limit on failed
        # authentications, where the engine has one, belongs here too.
        log.warning("dashboard_login_failed", client=request.client.host if request.client else None, reason=error)
        return render(request, "login.html", status=401, next=target, error=error)
    cookie, session = state(request).sessions.issue(secret)
    log.info("dashboard_login", api_key=key.name, client=request.client.host if request.client else None)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE, cookie, max_age=int(session.expires - time.time()), path=COOKIE_PATH,
        secure=ctx.settings.dashboard.secure_cookie, httponly=True, samesite="strict",
    )
    return _secured(response)


@router.post("/dashboard/logout")
async def logout(request: Request) -> Response:
    v, _, refusal = await checked_post(request)
    if refusal is not None:
        return refusal
    assert v is not None
    state(request).sessions.end(v.session)
    log.info("dashboard_logout", api_key=v.key.name)
    response = RedirectResponse(f"{COOKIE_PATH}/login", status_code=303)
    response.delete_cookie(COOKIE, path=COOKIE_PATH, secure=context(request).settings.dashboard.secure_cookie,
                           httponly=True, samesite="strict")
    return _secured(response)


# --------------------------------------------------------------------------- pages


async def _live_values(request: Request, page: str, ctx: HttpContext) -> dict[str, Any]:
    if page == "overview":
        return {"o": await data.overview(request, ctx)}
    if page == "providers":
        return {"p": await data.providers(request, ctx, state(request).shaping)}
    if page == "warmup":
        return {"w": await data.warmup(ctx, state(request).shaping)}
    domain = request.query_params.get("domain") or None
    return {"qv": await data.queue(ctx, normalize_domain(domain) if domain else None)}


async def _page(request: Request, page: str) -> Response:
    v = await viewer(request)
    if v is None:
        return to_login(request)
    values = await _live_values(request, page, context(request))
    query = f"?{request.url.query}" if request.url.query else ""
    return render(request, f"{page}.html", viewer=v, page=page, live_src=f"{COOKIE_PATH}/live/{page}{query}",
                  notice=_notice(request), **values)


def _notice(request: Request) -> str | None:
    """The result line after a queue action (the redirect carries it; only known words and a number are shown)."""
    done, n = request.query_params.get("done"), request.query_params.get("n", "")
    if done in ACTIONS and n.isdigit():
        return f"{done}: {int(n)} recipient(s) changed"
    return None


@router.get("/dashboard")
async def overview_page(request: Request) -> Response:
    return await _page(request, "overview")


@router.get("/dashboard/providers")
async def providers_page(request: Request) -> Response:
    return await _page(request, "providers")


@router.get("/dashboard/warmup")
async def warmup_page(request: Request) -> Response:
    return await _page(request, "warmup")


@router.get("/dashboard/queue")
async def queue_page(request: Request) -> Response:
    return await _page(request, "queue")


@router.get("/dashboard/live/{page}")
async def live(request: Request, page: str) -> Response:
    """The live region of a page, for its script to swap in; 401 when the session has ended."""
    if page not in LIVE_PAGES:
        return _secured(Response("unknown page", status_code=404, media_type="text/plain"))
    v = await viewer(request)
    if v is None:
        return _secured(Response("log in again", status_code=401, media_type="text/plain"))
    values = await _live_values(request, page, context(request))
    return render(request, f"_{page}.html", viewer=v, page=page, **values)


# --------------------------------------------------------------------------- queue actions


@router.get("/dashboard/queue/confirm")
async def queue_confirm(request: Request, action: str = "", domain: str = "") -> Response:
    """The confirmation step: what the action will change, and the form that does it (admin only)."""
    v = await viewer(request)
    if v is None:
        return to_login(request)
    if not v.admin:
        return refused(request, 403, "Only an API key with the 'admin' scope can change the queue.", v)
    if action not in ACTIONS or not domain:
        return refused(request, 400, "Choose an action (hold, release, retry) and a domain.", v)
    domain = normalize_domain(domain)
    qv = await data.queue(context(request), domain)
    return render(request, "confirm.html", viewer=v, page="queue", action=action, what=ACTIONS[action], domain=domain,
                  rows=qv["rows"], count=data.affected(action, qv["rows"]))


@router.post("/dashboard/queue/action")
async def queue_action(request: Request) -> Response:
    v, fields, refusal = await checked_post(request)
    if refusal is not None:
        return refusal
    assert v is not None
    if not v.admin:
        return refused(request, 403, "Only an API key with the 'admin' scope can change the queue.", v)
    action, domain = fields.get("action", ""), normalize_domain(fields.get("domain", ""))
    if action not in ACTIONS or not domain or fields.get("confirm") != "yes":
        return refused(request, 400, "Choose an action (hold, release, retry) and a domain, and confirm it.", v)
    ctx = context(request)
    before = data.affected(action, (await data.queue(ctx, domain))["rows"])
    changed = await ctx.outbox.manage(action, domain=domain)
    if ctx.audit is not None:
        await ctx.audit.record(
            Actor.api_key(v.key.name, v.key.id, request.client.host if request.client else None),
            f"queue.{action}", f"domain:{domain}", before={"matching": before, "via": "dashboard"}, after={"changed": changed},
        )
    log.info("dashboard_queue_action", api_key=v.key.name, action=action, domain=domain, matching=before, changed=changed,
             client=request.client.host if request.client else None)
    query = urlencode({"done": action, "n": changed, "domain": domain})
    return _secured(RedirectResponse(f"{COOKIE_PATH}/queue?{query}", status_code=303))


# --------------------------------------------------------------------------- search


@router.get("/dashboard/search")
async def search_page(request: Request, address: str = "") -> Response:
    v = await viewer(request)
    if v is None:
        return to_login(request)
    found, error = None, None
    if address.strip():
        try:
            if len(address) > 320:
                raise ValidationFailed("address is longer than 320 characters", "address")
            found = await data.search(context(request), normalize_address(address))
        except ValidationFailed as exc:
            error = exc.message
    return render(request, "search.html", viewer=v, page="search", address=address, found=found, error=error)
