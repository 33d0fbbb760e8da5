"""The webhook outbox: the only writer of ``webhook_deliveries`` and ``webhook_cursor``.

The same shape as the mail outbox, for the same reasons. A fan-out pass reads the event
stream in commit order (never skipping a late commit, see ``events_page``) and writes one
delivery row per (matching endpoint, event) while moving the cursor, in one statement.
Dispatchers on any number of hosts claim due rows with ``SKIP LOCKED`` and a lease, and
report results in one statement per round. A dispatcher killed mid-request leaves leases
that run out; the rows are sent again with the same ``webhook-id`` (at-least-once).

Order per recipient: only the oldest unfinished delivery of a recipient is claimable for an
endpoint, so its events arrive in stream order, and a recipient whose event is retrying
holds back only its own later events. After the last retry a delivery becomes a dead
letter (``failed``): kept, listed, and sent again by :meth:`Deliveries.replay`.
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from engine.db.pool import acquire
from engine.db.queries import q
from engine.errors import ValidationFailed
from engine.events.public import PUBLIC_TYPES

LANES = ("transactional", "default")
STATES = ("pending", "sending", "delivered", "failed")
MAX_REPLAY = 100_000
WAKE_CHANNEL = "engine_webhooks"
"""Dispatchers LISTEN here: endpoints changed or deliveries became due (a replay), look now."""


@dataclass(frozen=True, slots=True)
class FanOut:
    events: int
    """Events read from the stream (0 also when another dispatcher holds the fan-out)."""
    lanes: dict[tuple[uuid.UUID, str], int]
    """New deliveries per (endpoint, lane): whom to wake."""


@dataclass(frozen=True, slots=True)
class Claimed:
    id: int
    event_id: int
    recipient_id: int | None
    attempts: int
    """Attempts made before this one."""
    event_at: datetime


@dataclass(frozen=True, slots=True)
class Result:
    id: int
    state: str
    """delivered, pending (try again at ``next_attempt_at``) or failed (dead letter)."""
    next_attempt_at: datetime | None = None
    status: int | None = None
    error: str | None = None
    counted: bool = True
    """False: the request was never made (e.g. the endpoint was disabled meanwhile)."""


class Deliveries:
    def __init__(self, pool: asyncpg.Pool, transactional_streams: Sequence[str] = ("transactional",)) -> None:
        self.pool = pool
        self.transactional = list(transactional_streams)

    async def wake_dispatchers(self) -> None:
        """Tell every dispatcher (in any process, on any host) to look now instead of at its next poll."""
        async with acquire(self.pool) as conn:
            await conn.execute(*q("webhook_wake"))

    async def fan_out(self, now: datetime, limit: int, conn: asyncpg.Connection | None = None) -> FanOut:
        """Turn the next ``limit`` events into deliveries (one statement; a no-op while another dispatcher does)."""
        args = q("webhook_fanout", limit=limit, transactional=self.transactional, types=sorted(PUBLIC_TYPES), now=now)
        if conn is not None:
            rows = await conn.fetch(*args)
        else:
            async with acquire(self.pool) as c:
                rows = await c.fetch(*args)
        events = rows[0]["events"] if rows else 0
        lanes = {(r["endpoint_id"], r["lane"]): r["deliveries"] for r in rows if r["endpoint_id"] is not None}
        return FanOut(events, lanes)

    async def claim(
        self, endpoint_id: uuid.UUID, lane: str, owner: str, now: datetime, limit: int, lease: float,
    ) -> list[Claimed]:
        async with acquire(self.pool) as conn:
            rows = await conn.fetch(
                *q("webhook_claim", endpoint_id=endpoint_id, lane=lane, owner=owner, now=now, limit=limit, lease_seconds=lease)
            )
        return sorted(
            (Claimed(r["id"], r["event_id"], r["recipient_id"], r["attempts"], r["event_at"]) for r in rows),
            key=lambda c: c.id,
        )

    async def complete(self, owner: str, now: datetime, results: Sequence[Result]) -> int:
        """Record a round of results in one statement; returns how many rows this owner still held."""
        if not results:
            return 0
        async with acquire(self.pool) as conn:
            row = await conn.fetchrow(
                *q(
                    "webhook_complete", owner=owner, now=now,
                    ids=[r.id for r in results], states=[r.state for r in results],
                    next_attempt_ats=[r.next_attempt_at for r in results], statuses=[r.status for r in results],
                    errors=[None if r.error is None else r.error[:1000] for r in results],
                    counted=[r.counted for r in results],
                )
            )
        return int(row["done"]) if row is not None else 0

    async def release(self, owner: str, ids: Sequence[int]) -> int:
        if not ids:
            return 0
        async with acquire(self.pool) as conn:
            return len(await conn.fetch(*q("webhook_release", owner=owner, ids=list(ids))))

    async def reclaim(self, now: datetime) -> int:
        """Leases of dead dispatchers run out: their deliveries are due again."""
        async with acquire(self.pool) as conn:
            return len(await conn.fetch(*q("webhook_reclaim", now=now)))

    async def recovered(self, endpoint_id: uuid.UUID, now: datetime) -> int:
        """The endpoint answers again: retrying deliveries are due now instead of after their backoff."""
        async with acquire(self.pool) as conn:
            return len(await conn.fetch(*q("webhook_recovered", endpoint_id=endpoint_id, now=now)))

    async def replay(
        self, endpoint_id: uuid.UUID, now: datetime, *, dead_letters: bool = False,
        event_ids: Sequence[int] | None = None, since: datetime | None = None, until: datetime | None = None,
    ) -> int:
        """Send again: dead letters (all, or those of ``event_ids``) under their ids, or events by id or time range.

        Replays carry the original event id, so receivers that deduplicate on ``webhook-id`` can.
        """
        ids = list(event_ids) if event_ids is not None else None
        async with acquire(self.pool) as conn:
            if dead_letters:
                return len(await conn.fetch(*q("webhook_replay_dead", endpoint_id=endpoint_id, now=now, event_ids=ids)))
            if ids is None and since is None and until is None:
                raise ValidationFailed("say what to replay: event ids, a time range (since/until), or dead letters", field="body")
            if since is not None and until is not None and until <= since:
                raise ValidationFailed("until must be after since", field="until")
            rows = await conn.fetch(
                *q(
                    "webhook_replay_events", endpoint_id=endpoint_id, now=now, event_ids=ids, since=since, until=until,
                    transactional=self.transactional, types=sorted(PUBLIC_TYPES), limit=MAX_REPLAY,
                )
            )
        return len(rows)

    async def list(
        self, endpoint_id: uuid.UUID, *, state: str | None = None, before: int | None = None, limit: int = 100,
    ) -> list[asyncpg.Record]:
        if state is not None and state not in STATES:
            raise ValidationFailed(f"unknown state {state!r}; one of {', '.join(STATES)}", field="state")
        async with acquire(self.pool) as conn:
            return await conn.fetch(
                *q("webhook_deliveries_list", endpoint_id=endpoint_id, state=state, before=before, limit=limit)
            )

    async def status(
        self, now: datetime, endpoint_id: uuid.UUID | None = None, window: float = 3600.0,
    ) -> builtins.list[dict[str, Any]]:
        """Backlog, dead letters, oldest undelivered age and event-to-2xx lag per endpoint."""
        async with acquire(self.pool) as conn:
            rows = await conn.fetch(*q("webhook_status", now=now, endpoint_id=endpoint_id, window_seconds=window))
            cursor = await conn.fetchrow(*q("webhook_cursor_get"))
        out = []
        for r in rows:
            d = dict(r)
            d["fanout_cursor_at"] = cursor["updated_at"] if cursor is not None else None
            out.append(d)
        return out

    async def prune(self, now: datetime, keep: float) -> int:
        async with acquire(self.pool) as conn:
            return len(await conn.fetch(*q("webhook_prune", now=now, keep_seconds=keep)))


async def erase_deliveries(conn: asyncpg.Connection, event_ids: Sequence[int]) -> int:
    """Deliveries of erased events go too (nothing left to send; no address left behind)."""
    if not event_ids:
        return 0
    return len(await conn.fetch(*q("webhook_deliveries_erase", event_ids=list(event_ids))))
