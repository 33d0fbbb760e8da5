"""The worker registry: which delivery workers are alive, and which shaping file each applied.

The only writer of ``workers``. Each delivery worker upserts its row from its
lease heartbeat and right after a reload attempt, and deletes it on a clean
stop; a row not refreshed for a few of its own heartbeats is a dead worker
(stale), kept visible for a day and then pruned. ``engine workers`` and
``engine reload`` read it to show who runs and to confirm a reload reached
every live worker. Leases never depend on it: it is for operators.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from engine.db.pool import acquire
from engine.db.queries import q

ROW_KEEP = 86400.0
"""Seconds a dead worker's row stays visible (as stale) before it is pruned."""
STALE_BEATS = 3.0
"""A worker is stale after this many of its own heartbeat periods without a report..."""
STALE_GRACE = 2.0
"""...plus this many seconds (a busy database, a slow host)."""


@dataclass(frozen=True, slots=True)
class WorkerReport:
    """What one worker says about itself in its heartbeat."""

    owner: str
    started_at: datetime
    heartbeat_seconds: float
    shaping_source: str | None
    shaping_digest: str | None
    shaping_applied_at: datetime | None
    reload_id: str | None
    reload_error: str | None
    delivered: int


class WorkerRegistry:
    """Rows of ``workers`` over a pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def report(self, r: WorkerReport, *, prune: bool = False) -> None:
        """Upsert this worker's row (and, now and then, drop rows of workers dead for a day)."""
        async with acquire(self.pool) as conn:
            if prune:
                await conn.execute(*q("workers_prune", keep_seconds=ROW_KEEP))
            await conn.execute(
                *q(
                    "worker_upsert", owner=r.owner, host=socket.gethostname(), pid=os.getpid(),
                    started_at=r.started_at, heartbeat_seconds=r.heartbeat_seconds,
                    shaping_source=r.shaping_source, shaping_digest=r.shaping_digest,
                    shaping_applied_at=r.shaping_applied_at, reload_id=r.reload_id,
                    reload_error=r.reload_error, delivered=r.delivered,
                )
            )

    async def gone(self, owner: str) -> None:
        """Clean shutdown: the worker is gone, not stale."""
        async with acquire(self.pool) as conn:
            await conn.execute(*q("worker_delete", owner=owner))

    async def list(self) -> list[dict[str, Any]]:
        """Every worker row, with ``stale`` (not seen for a few of its own heartbeats) and ``age_seconds``."""
        async with acquire(self.pool) as conn:
            rows = await conn.fetch(*q("workers_list", beats=STALE_BEATS, grace=STALE_GRACE))
        return [dict(r) for r in rows]
