"""Tracking endpoints: the open pixel, click redirects and one-click unsubscribe.

No API key: the signed token is the credential, and it names only a recipient
row (see :mod:`engine.compose.tracking`). Bad tokens never cause a 500:
forged, truncated or wrong-kind tokens are 404, genuine but expired ones 410,
both logged. Routes:

* ``GET /t/o/{token}``: always a 1x1 transparent GIF (an image that fails to
  load is worse than a lost open); an ``opened`` event when the token verifies.
* ``GET /t/c/{token}``: 302 to ``links[index]`` of that recipient's copy,
  recovered by re-rendering it (:meth:`Composer.links`), so the redirect can
  only lead where the message pointed; a ``clicked`` event.
* ``GET /u/{token}``: a confirmation page that changes nothing (link scanners
  and mail-client prefetches follow GETs): it checks the token and shows a
  form that POSTs back to the same URL. ``POST /u/{token}`` records, either
  RFC 8058 one-click (body ``List-Unsubscribe=One-Click``, method
  ``one-click``) or that form (method ``post``): it suppresses the address for
  the message's stream and writes one ``unsubscribed`` event per recipient, in
  one transaction, before answering.
"""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime
from html import escape
from typing import Any
from urllib.parse import parse_qs

import structlog
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from engine.api.deps import TrackingDeps, get_tracking
from engine.compose.pipeline import MessageRow
from engine.compose.tracking import Token, TokenExpired, TokenInvalid, TokenKind
from engine.consent.models import ConsentIn
from engine.consent.store import apply_changes
from engine.db.pool import acquire
from engine.db.queries import q
from engine.errors import DatabaseUnavailable, EngineError
from engine.suppression import normalize_address

log = structlog.get_logger(__name__)

# The smallest transparent GIF (43 bytes).
PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
NO_CACHE = {
    "Cache-Control": "no-store, no-cache, must-revalidate, max-age=0, private",
    "Pragma": "no-cache",
    "Expires": "0",
}
_PAGE_HEADERS = {**NO_CACHE, "Referrer-Policy": "no-referrer", "X-Robots-Tag": "noindex, nofollow"}

router = APIRouter(tags=["tracking"])

# What the OpenAPI document says these public routes answer. They take no API key, so none
# lists 401/403 (the app adds those only to the keyed routers, see engine.api.app).
_HTML = {"text/html": {"schema": {"type": "string"}}}
_TEXT = {"text/plain": {"schema": {"type": "string"}}}
_DB_DOWN: dict[int | str, dict[str, Any]] = {
    503: {"description": "The database is unavailable; nothing was recorded, retry later"},
}
_OPEN_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A 1x1 transparent GIF, whatever the token (an open is recorded when it verifies)",
        "content": {"image/gif": {"schema": {"type": "string", "format": "binary"}}},
    },
}
_CLICK_RESPONSES: dict[int | str, dict[str, Any]] = {
    302: {
        "description": "Redirect to the message's own link",
        "headers": {"Location": {"description": "The link's URL", "schema": {"type": "string", "format": "uri"}}},
    },
    404: {"description": "The token is not valid (forged, wrong kind, unknown recipient or link)", "content": _TEXT},
    410: {"description": "The token has expired", "content": _TEXT},
    **_DB_DOWN,
}
_UNSUBSCRIBE_REFUSED: dict[int | str, dict[str, Any]] = {
    404: {"description": "The token is not valid; nothing was changed", "content": _HTML},
    410: {"description": "The token has expired; nothing was changed", "content": _HTML},
    **_DB_DOWN,
}


class _Refused(Exception):
    """Internal: answer with this status (404/410) after logging."""

    def __init__(self, status: int) -> None:
        self.status = status


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    html = (
        "<!doctype html><html><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
        f"<title>{escape(title)}</title></head>"
        "<body style=\"font-family:sans-serif;max-width:32em;margin:3em auto;padding:0 1em\">"
        f"<h1 style=\"font-size:1.4em\">{escape(title)}</h1>{body}</body></html>"
    )
    return HTMLResponse(html, status_code=status, headers=_PAGE_HEADERS)


_NOT_FOUND_TEXT = {404: "This link is not valid.", 410: "This link has expired."}


def _verify(deps: TrackingDeps, token: str, kind: TokenKind, endpoint: str) -> Token:
    if deps.keyring is None:
        log.warning("tracking_token_refused", endpoint=endpoint, reason="tracking keys are not configured")
        raise _Refused(404)
    try:
        tok = deps.keyring.verify(token)
    except TokenExpired as exc:
        log.warning("tracking_token_expired", endpoint=endpoint, recipient_id=exc.token.recipient_id)
        raise _Refused(410) from None
    except TokenInvalid as exc:
        log.warning("tracking_token_invalid", endpoint=endpoint, reason=str(exc))
        raise _Refused(404) from None
    if tok.kind != kind:
        log.warning("tracking_token_wrong_kind", endpoint=endpoint, kind=tok.kind.name.lower())
        raise _Refused(404)
    return tok


async def _load_recipient(deps: TrackingDeps, rid: int) -> Any:
    async with acquire(deps.pool) as conn:
        row = await conn.fetchrow(*q("tracking_recipient", recipient_id=rid))
    if row is None:
        log.warning("tracking_recipient_gone", recipient_id=rid)
        raise _Refused(404)
    return row


# ---- open pixel


@router.get(
    "/t/o/{token}", response_class=Response, responses=_OPEN_RESPONSES, summary="Open pixel (always a 1x1 GIF)"
)
async def open_pixel(token: str, deps: TrackingDeps = Depends(get_tracking)) -> Response:
    try:
        tok = _verify(deps, token, TokenKind.OPEN, "open")
        await deps.events.record_for_recipient("opened", tok.recipient_id, {})
    except _Refused:
        pass
    except (DatabaseUnavailable, EngineError) as exc:
        log.warning("open_not_recorded", error=str(exc))
    except Exception:
        log.exception("open_failed")
    return Response(PIXEL, media_type="image/gif", headers=NO_CACHE)


# ---- click redirect


@router.get(
    "/t/c/{token}", status_code=302, response_class=RedirectResponse, responses=_CLICK_RESPONSES,
    summary="Click redirect to the message's own link",
)
async def click(token: str, deps: TrackingDeps = Depends(get_tracking)) -> Response:
    try:
        tok = _verify(deps, token, TokenKind.CLICK, "click")
        row = await _load_recipient(deps, tok.recipient_id)
        url = await _link(deps, row, tok.link_index)
        await deps.events.record_for_recipient("clicked", tok.recipient_id, {"link_index": tok.link_index, "url": url})
    except _Refused as exc:
        return Response(_NOT_FOUND_TEXT[exc.status], status_code=exc.status, media_type="text/plain", headers=NO_CACHE)
    return RedirectResponse(url, status_code=302, headers={**NO_CACHE, "Referrer-Policy": "no-referrer"})


async def _link(deps: TrackingDeps, row: Any, index: int) -> str:
    if row["is_raw"] or not row["content"] or deps.composer is None:
        log.warning("click_without_links", recipient_id=row["id"])
        raise _Refused(404)
    msg = MessageRow.from_stored(
        id=row["message_id"], mail_from=row["mail_from"], stream=row["stream"], raw=None,
        content=row["content"], metadata=row["metadata"] or {},
    )
    if msg.content is not None and msg.content.template and deps.templates is not None:
        await deps.templates.prepare([msg.content.template])
    try:
        links = await asyncio.to_thread(deps.composer.links, msg, row["vars"] or {})
    except EngineError as exc:  # the template can no longer be rendered
        log.warning("click_links_unavailable", recipient_id=row["id"], error=str(exc))
        raise _Refused(404) from None
    if not 0 <= index < len(links):
        log.warning("click_link_index_out_of_range", recipient_id=row["id"], index=index, links=len(links))
        raise _Refused(404)
    return links[index]


# ---- unsubscribe


async def _unsubscribe(deps: TrackingDeps, token: str, method: str) -> tuple[int, str]:
    """Revoke consent (or suppress) and record; returns (status, stream).

    On a stream with a consent rule the unsubscribe revokes that stream's purpose (source
    ``list-unsubscribe``), which also stops the address's queued mail of every stream with that
    purpose; on other streams it suppresses the address for the stream, as before consent.
    """
    tok = _verify(deps, token, TokenKind.UNSUBSCRIBE, "unsubscribe")
    row = await _load_recipient(deps, tok.recipient_id)
    stream = row["stream"]
    policy = deps.consent
    async with acquire(deps.pool) as conn, conn.transaction():
        data: dict[str, Any] = {"stream": stream, "method": method}
        if policy is not None and policy.enforced(stream):
            purpose = policy.purposes[stream]
            change = ConsentIn(
                address=normalize_address(row["address"]), purpose=purpose, status="revoked",
                source="list-unsubscribe", captured_at=datetime.now(UTC), contact_id=row["contact_id"],
            )
            applied = await apply_changes(conn, [change], "list-unsubscribe", policy)
            new = applied.counts["new"] + applied.counts["changed"] > 0
            data["revoked"] = purpose
        else:
            new = await deps.suppressions.add(row["address"], stream, "unsubscribed", "list-unsubscribe", conn=conn)
        seen = await deps.events.exists_for_recipient("unsubscribed", row["message_id"], row["id"], conn=conn)
        if not seen:
            await deps.events.record_for_recipient("unsubscribed", row["id"], data, conn=conn)
    log.info("unsubscribed", recipient_id=row["id"], stream=stream, method=method, new=new)
    return 200, stream


def _form(token: str) -> str:
    return (
        f'<form method="post" action="/u/{escape(token, quote=True)}">'
        '<button type="submit">Unsubscribe</button></form>'
    )


@router.get(
    "/u/{token}", response_class=HTMLResponse, responses=_UNSUBSCRIBE_REFUSED,
    summary="Unsubscribe confirmation page (changes nothing)",
)
async def unsubscribe_page(token: str, deps: TrackingDeps = Depends(get_tracking)) -> HTMLResponse:
    try:
        tok = _verify(deps, token, TokenKind.UNSUBSCRIBE, "unsubscribe")
        row = await _load_recipient(deps, tok.recipient_id)
    except _Refused as exc:
        return _page(_NOT_FOUND_TEXT[exc.status], "<p>Nothing was changed.</p>", exc.status)
    return _page(
        "Unsubscribe?",
        f"<p>Stop receiving <b>{escape(row['stream'])}</b> messages at this address?</p>" + _form(token),
    )


@router.post(
    "/u/{token}", response_class=HTMLResponse, responses=_UNSUBSCRIBE_REFUSED,
    summary="Unsubscribe (RFC 8058 one-click or the confirmation form)",
)
async def unsubscribe_post(token: str, request: Request, deps: TrackingDeps = Depends(get_tracking)) -> HTMLResponse:
    body = (await request.body())[:1024].decode("utf-8", "replace")
    one_click = parse_qs(body).get("List-Unsubscribe") == ["One-Click"]
    try:
        _, stream = await _unsubscribe(deps, token, "one-click" if one_click else "post")
    except _Refused as exc:
        return _page(_NOT_FOUND_TEXT[exc.status], "<p>Nothing was changed.</p>", exc.status)
    return _page("You are unsubscribed", f"<p>You will no longer receive <b>{escape(stream)}</b> messages.</p>")
