"""``/v1/suppressions``: list and export (read scope), add and lift (admin scope) suppressions.

Adding is an operator decision with lasting effect (mail to the address stops,
including mail already queued), so it needs ``admin`` like other configuration;
reading needs ``read``. Errors are JSON ``{"error", "field"}`` like the rest of
the API: a bad address or scope is a 422 naming the field, never a 500. The listing is an
export: keyset pages in address order (``next`` -> ``after``), or all of it streamed as NDJSON
(``format=ndjson``), so a CRM can mirror the list however long it is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import structlog
from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, StreamingResponse

from engine.api.consent import decode_after, encode_after
from engine.api.deps import Audit, HttpContext, get_audit, get_ctx, get_suppressions, require_admin, require_read
from engine.api.models import SuppressionAdded, SuppressionIn, SuppressionList, SuppressionRemoved
from engine.apikeys import ApiKey
from engine.errors import NotFound
from engine.suppression import Suppression, Suppressions, configured_scope, normalize_address

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/v1/suppressions", tags=["suppressions"])


def _out(r: Suppression) -> dict[str, Any]:
    return {"address": r.address, "scope": r.scope, "reason": r.reason, "source": r.source, "created_at": r.created_at}


@router.get(
    "", response_model=SuppressionList,
    summary="Suppressions in address order, by cursor (optionally one address; all as NDJSON with format=ndjson)",
)
async def list_suppressions(
    address: str | None = Query(default=None, max_length=320),
    after: str | None = Query(default=None, max_length=2000, description="The 'next' of the previous page."),
    limit: int = Query(default=100, ge=1, le=10000),
    format: str = Query(default="json", pattern="^(json|ndjson)$"),
    key: ApiKey = Depends(require_read),
    suppressions: Suppressions = Depends(get_suppressions),
) -> Any:
    start: tuple[str, str] | None = decode_after(after, 2) if after else None  # type: ignore[assignment]
    if format == "ndjson":
        async def stream() -> AsyncIterator[bytes]:
            pos = start
            while True:
                rows = await suppressions.page(pos, 5000, address or None)
                if not rows:
                    return
                yield b"".join(orjson.dumps(_out(r)) + b"\n" for r in rows)
                pos = (rows[-1].address, rows[-1].scope)
        return StreamingResponse(stream(), media_type="application/x-ndjson")
    rows = await suppressions.page(start, limit, address or None)
    nxt = encode_after(rows[-1].address, rows[-1].scope) if len(rows) == limit else None
    return {"suppressions": [_out(r) for r in rows], "next": nxt}


@router.post(
    "", status_code=201, response_model=SuppressionAdded,
    summary="Suppress an address (201 new, 200 already suppressed); stops its queued mail",
)
async def add_suppression(
    body: SuppressionIn,
    key: ApiKey = Depends(require_admin),
    suppressions: Suppressions = Depends(get_suppressions),
    ctx: HttpContext = Depends(get_ctx),
    audit: Audit = Depends(get_audit),
) -> JSONResponse:
    scope = configured_scope(body.scope, ctx.settings.queue.streams)
    address = normalize_address(body.address)
    async with audit.transaction() as conn:
        new, moved = await suppressions.suppress(body.address, scope, body.reason, f"api:{key.name}"[:200], conn=conn)
        await audit(
            "suppression.add", address=address, before={"suppressed": not new, "scope": body.scope},
            after={"scope": body.scope, "reason": body.reason, "created": new, "pending_suppressed": moved}, conn=conn,
        )
    log.info("suppression_added", address=address, scope=body.scope, new=new, pending_suppressed=moved)
    return JSONResponse(
        {"address": address, "scope": body.scope, "created": new, "pending_suppressed": moved},
        status_code=201 if new else 200,
    )


@router.delete("/{address}", response_model=SuppressionRemoved, summary="Lift a suppression (every scope unless ?scope=)")
async def remove_suppression(
    address: str,
    scope: str | None = Query(default=None, max_length=64),
    key: ApiKey = Depends(require_admin),
    suppressions: Suppressions = Depends(get_suppressions),
    audit: Audit = Depends(get_audit),
) -> dict[str, Any]:
    removed = await suppressions.remove(address, scope)
    if not removed:
        raise NotFound(f"{address} is not suppressed" + (f" for scope {scope!r}" if scope else ""))
    await audit("suppression.remove", address=normalize_address(address), before={"scopes": removed})
    log.info("suppression_removed", address=normalize_address(address), scopes=removed)
    return {"address": normalize_address(address), "removed_scopes": removed}
