"""``GET /v1/audit``: the audit log by cursor, or streamed as NDJSON for a SIEM (admin scope).

The cursor is a position in commit order, like ``GET /v1/events``: a shipper stores ``next``
and asks again, and never misses a row whose transaction committed late. ``format=ndjson``
streams every matching row after the cursor, one JSON object per line.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse

from engine.api.deps import get_audit_log, require_admin
from engine.apikeys import ApiKey
from engine.audit import AuditLog, audit_target, check_action
from engine.events.public import Cursor

router = APIRouter(prefix="/v1/audit", tags=["audit"])

STREAM_PAGE = 1000


@router.get("", summary="Admin actions after a cursor, in commit order (format=ndjson streams them all)")
async def list_audit(
    after: str | None = Query(default=None, max_length=100, description="The 'next' of the previous page; omitted: the beginning."),
    action: str | None = Query(default=None, max_length=64, description="An action (apikey.rotate) or a family (queue.*)."),
    actor: str | None = Query(default=None, max_length=200, description="An API key name, or cli:<user>."),
    target: str | None = Query(
        default=None, max_length=500,
        description="What was acted on: a name, an id, or an email address (matched by the hash the log keeps).",
    ),
    since: datetime | None = Query(default=None, description="Only rows at or after this time (ISO 8601)."),
    until: datetime | None = Query(default=None, description="Only rows before this time (ISO 8601)."),
    limit: int = Query(default=100, ge=1, le=1000),
    format: str = Query(default="json", pattern="^(json|ndjson)$"),
    key: ApiKey = Depends(require_admin),
    log: AuditLog = Depends(get_audit_log),
) -> Any:
    cursor = Cursor.decode(after) if after else Cursor()
    filters: dict[str, Any] = {
        "action": check_action(action), "actor": actor or None, "target": audit_target(target), "since": since, "until": until,
    }
    if format == "ndjson":
        async def stream() -> AsyncIterator[bytes]:
            pos = cursor
            while True:
                page = await log.page(pos, limit=STREAM_PAGE, **filters)
                if page.entries:
                    yield b"".join(orjson.dumps(e) + b"\n" for e in page.entries)
                if not page.has_more:
                    return
                pos = page.next

        return StreamingResponse(stream(), media_type="application/x-ndjson")
    page = await log.page(cursor, limit=limit, **filters)
    return {"entries": page.entries, "next": page.next.encode(), "has_more": page.has_more}
