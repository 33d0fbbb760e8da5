"""``GET /v1/events``: the event stream by cursor (read scope).

The cursor is a position in commit order (see ``events_page``), so paging never skips an
event whose transaction commits late and never returns one twice. A consumer stores
``next`` and asks again; an empty page keeps the cursor where it was.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Depends, Query

from engine.api.deps import get_events, require_read
from engine.api.models import EventPageOut
from engine.apikeys import ApiKey
from engine.errors import ValidationFailed
from engine.events.public import Cursor, internal_types
from engine.events.store import EventStore

router = APIRouter(prefix="/v1/events", tags=["events"])


@router.get("", response_model=EventPageOut, summary="Events after a cursor, in commit order")
async def list_events(
    after: str | None = Query(default=None, max_length=100, description="The 'next' of the previous page; omitted: the beginning."),
    type: list[str] | None = Query(default=None, description="Event types (repeatable), e.g. email.delivered."),
    stream: str | None = Query(default=None, max_length=64),
    message_id: uuid.UUID | None = Query(default=None),
    recipient: str | None = Query(default=None, max_length=320, description="Recipient address, or a recipient id."),
    limit: int = Query(default=100, ge=1, le=1000),
    key: ApiKey = Depends(require_read),
    events: EventStore = Depends(get_events),
) -> dict[str, Any]:
    cursor = Cursor.decode(after) if after else Cursor()
    types = internal_types(type or None, field="type")
    recipient_id: int | None = None
    address: str | None = None
    if recipient:
        if recipient.isdigit():
            recipient_id = int(recipient)
            if recipient_id >= 2**63:
                raise ValidationFailed("recipient id out of range", field="recipient")
        elif "@" in recipient:
            address = recipient
        else:
            raise ValidationFailed("recipient must be an address or a recipient id", field="recipient")
    page = await events.page(
        cursor, types=types, limit=limit, stream=stream, message_id=message_id, recipient_id=recipient_id, address=address,
    )
    return {"events": page.events, "next": page.next.encode(), "has_more": page.has_more}
