"""Event rows: what happened to which recipient, as an append-only log. The only writer of ``events``.

Every change of a recipient's state is recorded here in the same transaction as
the change itself: the outbox calls :func:`record_events` with its connection
right after each state-changing statement, so the stream can never say more or
less than the queue did. Observations that change no row (opens, clicks,
complaints, delay notices, shaping decisions) come through here too. Webhooks,
``GET /v1/events``, exports and metrics read this one table.

Writes are batched (one statement for any number of events) so the delivery
path pays one statement per batch, not per recipient. Every payload is
versioned (``{"v": 1, ...}``) so consumers can tell old rows from new ones when
fields are added. ``events.id`` is unique and never reused: consumers
deduplicate on it.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import asyncpg

from engine.db import partitions
from engine.db.pool import acquire
from engine.db.queries import q
from engine.errors import EngineError
from engine.events.public import Cursor, public_event

PAYLOAD_VERSION = 1
RECIPIENT_STATE_EVENTS = frozenset(
    {"accepted", "deferred", "delivered", "bounced", "expired", "suppressed", "held", "released"}
)
"""Events that report a change of a recipient row's state (written by the outbox with the change)."""
EVENT_TYPES = RECIPIENT_STATE_EVENTS | {
    "complained", "opened", "clicked", "unsubscribed", "shaping_decision", "consent_changed", "contact_erased",
}


@dataclass(frozen=True, slots=True)
class Event:
    type: str
    recipient_id: int | None = None
    message_id: uuid.UUID | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    """None means the database's now()."""


def payload(data: Mapping[str, Any] | None) -> dict[str, Any]:
    """The stored form: the caller's fields plus the payload version (``v``)."""
    return {"v": PAYLOAD_VERSION, **(data or {})}


def _check(event_type: str) -> str:
    if event_type not in EVENT_TYPES:
        raise EngineError(f"unknown event type {event_type!r}; known: {', '.join(sorted(EVENT_TYPES))}")
    return event_type


async def record_events(conn: asyncpg.Connection, events: Sequence[Event]) -> int:
    """Insert events in one statement inside the caller's transaction; returns how many were written."""
    if not events:
        return 0
    # Events of one message often share one data mapping (every recipient's `accepted`): build each
    # stored payload once per mapping, not once per event.
    stored: dict[int, dict[str, Any]] = {}
    datas = []
    for e in events:
        d = stored.get(id(e.data))
        if d is None:
            d = stored[id(e.data)] = payload(e.data)
        datas.append(d)
    await conn.execute(
        *q(
            "events_insert",
            types=[_check(e.type) for e in events],
            recipient_ids=[e.recipient_id for e in events],
            message_ids=[e.message_id for e in events],
            datas=datas,
            created_ats=[e.created_at for e in events],
        )
    )
    return len(events)


async def record_consent_history(conn: asyncpg.Connection, history_ids: Sequence[int]) -> int:
    """One ``consent_changed`` event per consent history row, built by Postgres from the row.

    A bulk consent import records thousands of changes per batch: passing their history ids
    costs the engine nothing per change, where building and encoding each payload cost it
    several microseconds (and Postgres as many to parse the JSON back).
    """
    if not history_ids:
        return 0
    await conn.execute(*q("events_insert_consent_history", version=PAYLOAD_VERSION, ids=list(history_ids)))
    return len(history_ids)


async def event_exists_for_recipient(
    conn: asyncpg.Connection, event_type: str, message_id: uuid.UUID, recipient_id: int
) -> bool:
    """Whether ``recipient_id`` already has an event of ``event_type`` (a complaint is counted once)."""
    args = q("event_exists_for_recipient", type=_check(event_type), message_id=message_id, recipient_id=recipient_id)
    return bool(await conn.fetchval(*args))


@dataclass(frozen=True, slots=True)
class EventPage:
    events: list[dict[str, Any]]
    """Public form (:func:`engine.events.public.public_event`), in stream order."""
    next: Cursor
    """Where the next page starts: the last event returned, or the cursor given when none was."""
    has_more: bool


async def read_page(
    conn: asyncpg.Connection, after: Cursor, *, types: Sequence[str], limit: int,
    stream: str | None = None, message_id: uuid.UUID | None = None,
    recipient_id: int | None = None, address: str | None = None,
) -> EventPage:
    """Events after ``after`` in commit order (see ``events_page``): never one skipped, never one twice."""
    rows = await conn.fetch(
        *q(
            "events_page", tx=str(after.tx), id=after.id, types=list(types), stream=stream, message_id=message_id,
            recipient_id=recipient_id, address=address.lower() if address else None, limit=limit + 1,
        )
    )
    more = len(rows) > limit
    rows = rows[:limit]
    nxt = Cursor(rows[-1]["tx"], rows[-1]["id"]) if rows else after
    return EventPage([public_event(r) for r in rows], nxt, more)


async def public_events_by_id(conn: asyncpg.Connection, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Events by id in public form (rows that no longer exist are absent)."""
    rows = await conn.fetch(*q("events_by_ids", ids=list(ids)))
    return {r["id"]: public_event(r) for r in rows}


class EventStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def record(self, events: Sequence[Event], *, conn: asyncpg.Connection | None = None) -> int:
        """Insert events in one statement; returns how many were written."""
        if conn is not None:
            return await record_events(conn, events)
        async with acquire(self.pool) as c:
            return await record_events(c, events)

    async def record_for_recipient(
        self, event_type: str, recipient_id: int, data: Mapping[str, Any] | None = None,
        *, conn: asyncpg.Connection | None = None,
    ) -> bool:
        """One event whose message id is looked up from the recipient row in the same statement.

        False when the recipient row no longer exists (nothing is written).
        """
        args = q("event_insert_for_recipient", type=_check(event_type), recipient_id=recipient_id, data=payload(data))
        if conn is not None:
            return await conn.fetchval(*args) is not None
        async with acquire(self.pool) as c:
            return await c.fetchval(*args) is not None

    async def exists_for_recipient(
        self, event_type: str, message_id: uuid.UUID, recipient_id: int, *, conn: asyncpg.Connection | None = None
    ) -> bool:
        if conn is not None:
            return await event_exists_for_recipient(conn, event_type, message_id, recipient_id)
        async with acquire(self.pool) as c:
            return await event_exists_for_recipient(c, event_type, message_id, recipient_id)

    async def page(self, after: Cursor, *, types: Sequence[str], limit: int, **filters: Any) -> EventPage:
        async with acquire(self.pool) as conn:
            return await read_page(conn, after, types=types, limit=limit, **filters)

    async def for_message(self, message_id: uuid.UUID) -> list[asyncpg.Record]:
        async with acquire(self.pool) as conn:
            return await conn.fetch(*q("events_for_message", message_id=message_id))


async def erase_events(
    conn: asyncpg.Connection, address: str, recipient_ids: Sequence[int], message_ids: Sequence[uuid.UUID],
) -> list[int]:
    """Delete the events that name an erased address; returns their ids (for the webhook outbox)."""
    rows = await conn.fetch(
        *q("events_erase", address=address, recipient_ids=list(recipient_ids), message_ids=list(message_ids))
    )
    return [r["id"] for r in rows]


async def prune_events(
    conn: asyncpg.Connection, before: datetime, limit: int, export_destination: str | None = None
) -> int:
    """Delete up to ``limit`` events written before ``before`` that no webhook endpoint still waits for.

    Kept regardless of age: events an enabled endpoint has a pending or sending delivery for, and
    (while any endpoint is enabled) events the fan-out has not reached, and (when the exporter
    runs, to ``export_destination``) events it has not written yet. A dead letter does not keep
    its event: replaying it after the event is gone ends it as "the event no longer exists".
    """
    args = q("events_prune", before=before, limit=limit, export_destination=export_destination)
    return len(await conn.fetch(*args))


async def events_due(conn: asyncpg.Connection, before: datetime, export_destination: str | None = None) -> int:
    """How many events :func:`prune_events` would take now."""
    return int(await conn.fetchval(*q("events_due", before=before, export_destination=export_destination)))


async def drop_event_days(
    conn: asyncpg.Connection, before: datetime, export_destination: str | None = None
) -> list[date]:
    """Drop the day partitions of ``events`` whose whole day lies before ``before`` and whose
    events nobody waits for any more (the conditions of :func:`prune_events`, for the whole day);
    returns the days dropped. A day still owed to an endpoint or the exporter stays whole until a
    later pass (its events go by :func:`prune_events` meanwhile, one by one, as they are released).
    """
    dropped = []
    for part in partitions.whole_days_before(await partitions.partitions(conn, "events"), before):
        if part.day is None:
            continue
        held = await conn.fetchval(*q("events_day_held", day=part.day, export_destination=export_destination))
        if not held and await partitions.drop(conn, "events", part.day):
            dropped.append(part.day)
    return dropped
