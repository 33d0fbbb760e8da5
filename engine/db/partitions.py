"""Day partitions of ``events`` and ``attempts`` (migration 0017): created ahead, listed, dropped.

Why by day: retention then removes a day of old rows by dropping its partition, a catalog change
that costs the same for ten rows or ten million, instead of deleting them in batches (WAL, vacuum,
bloat). Each partition covers one UTC day and is named ``<table>_pYYYYMMDD``; a default partition
takes any row no day partition covers, so an insert never fails for lack of one.

The engine's housekeeping calls :func:`ensure` at start and hourly: today and the next
:data:`DAYS_AHEAD` days exist, so a stopped maintainer has a week before rows fall into the
default partition (and even then nothing fails; the next :func:`ensure` moves a day's rows out of
the default partition into the day's new partition). Which days may be dropped is each table's
owner's decision (:func:`engine.events.store.drop_event_days`,
:func:`engine.outbox.drop_attempt_days`); this module only runs the DDL functions of migration
0017, so no partition name is ever assembled into SQL here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

import asyncpg

from engine.db.queries import q

PARTITIONED = ("events", "attempts")
"""The tables partitioned by day, and the column each is partitioned on (``created_at``, ``at``)."""
DAYS_AHEAD = 7
"""Day partitions kept ready beyond today."""


@dataclass(frozen=True, slots=True)
class Partition:
    parent: str
    name: str
    day: date | None
    """The UTC day it holds; None for the default partition."""
    bytes: int
    estimated_rows: int

    @property
    def end(self) -> datetime | None:
        """The first instant after its day (None for the default partition)."""
        return None if self.day is None else datetime.combine(self.day + timedelta(days=1), time(), UTC)


async def ensure(conn: asyncpg.Connection, ahead: int = DAYS_AHEAD) -> int:
    """Create the missing day partitions from today to ``ahead`` days on; returns how many were new.

    Idempotent and safe with several engines at once (an advisory lock serialises creation). One
    partition per transaction: the connection must not be inside a transaction block."""
    today = datetime.now(UTC).date()
    created = 0
    for parent in PARTITIONED:
        for n in range(ahead + 1):
            created += await create(conn, parent, today + timedelta(days=n))
    return created


async def create(conn: asyncpg.Connection, parent: str, day: date) -> bool:
    """``parent``'s partition of ``day`` (UTC), with the day's rows moved out of the default
    partition; False when it existed already."""
    if parent not in PARTITIONED:
        raise ValueError(f"{parent!r} is not partitioned by day")
    return bool(await conn.fetchval(*q("partition_create", parent=parent, day=day)))


async def partitions(conn: asyncpg.Connection, parent: str | None = None) -> list[Partition]:
    """The partitions of one table (or both), the default partition first, then by day."""
    rows = await conn.fetch(*q("partitions_list", parents=[parent] if parent else list(PARTITIONED)))
    return [Partition(r["parent"], r["name"], r["day"], r["bytes"], r["estimated_rows"]) for r in rows]


async def drop(conn: asyncpg.Connection, parent: str, day: date) -> bool:
    """Detach and drop ``parent``'s partition of ``day``; False when it was not there (any more).

    Called by the table's owner only, once it has decided the day's rows may go."""
    if parent not in PARTITIONED:
        raise ValueError(f"{parent!r} is not partitioned by day")
    return bool(await conn.fetchval(*q("partition_drop", parent=parent, day=day)))


def whole_days_before(found: list[Partition], before: datetime) -> list[Partition]:
    """The day partitions whose whole day lies before ``before``, oldest first."""
    return [p for p in found if p.end is not None and p.end <= before]
