"""The purge: each kind of old data goes in small batches, each table by its own owner.

Why batches and not one ``DELETE``: a statement that deletes millions of rows holds its locks
and its transaction for minutes, bloats WAL in one burst and makes every reader of the table wait
on vacuum. Here every batch (``[retention] batch_size`` rows, default 5,000) is one statement in
its own short transaction, walking an index oldest first, with ``SKIP LOCKED`` so it never waits
for a row someone else holds, and a pause between batches. Several engines may purge at once:
they skip each other's rows.

Who deletes what (one writer per table): the outbox blanks bodies and deletes recipients,
attempts and emptied messages (:func:`engine.outbox.prune_bodies`,
:func:`engine.outbox.prune_recipients`); the event store deletes events
(:func:`engine.events.store.prune_events`), keeping those a webhook still owes an endpoint; the
audit log's owner deletes its entries (``engine.audit.prune``, looked up at run time: see
:data:`AUDIT_OWNER`). Delivered webhook rows are pruned by the dispatcher itself
(``[webhooks] keep_delivered``).

Day partitions (migration 0017, :mod:`engine.db.partitions`): ``events`` and ``attempts`` are
partitioned by UTC day, so a pass first drops each whole day older than the window (attempts: the
``recipients`` window; events: only a day no webhook endpoint, fan-out or exporter still waits for),
a catalog change instead of a million deletes. The batches then take what no drop could: the
default partition, the day the cut-off falls in, and events released one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import Any

import asyncpg
import structlog

from engine.db import partitions
from engine.db.pool import acquire
from engine.db.queries import q
from engine.errors import DatabaseUnavailable
from engine.events.store import drop_event_days, events_due, prune_events
from engine.outbox import drop_attempt_days, due_for_retention, prune_bodies, prune_recipients
from engine.retention.config import RetentionConfig

log = structlog.get_logger(__name__)

KINDS = ("message_bodies", "recipients", "events", "audit")
"""Each kind of data with its own window, in the order a pass purges them."""
TABLES = ("messages", "recipients", "attempts", "events", "webhook_deliveries", "audit_log")
"""Tables whose size ``engine retention show`` prints."""
AUDIT_OWNER = "engine.audit"
"""The audit log's owner module (built in parallel with this one). Its ``prune(conn, before,
limit=...) -> int`` deletes a batch of entries written before ``before``; an optional
``due(conn, before) -> int`` counts them for ``engine retention show``. Looked up at run time so
retention works (and reports the audit kind as skipped) in a build without an audit log."""
_MAX_AUDIT_CALLS = 10_000


@dataclass(frozen=True, slots=True)
class Policy:
    """The cut-off of each kind at one instant: rows older than it are due (None: kept forever)."""

    now: datetime
    windows: dict[str, float | None]

    @classmethod
    def at(cls, config: RetentionConfig, now: datetime | None = None) -> Policy:
        return cls(now or datetime.now(UTC), {k: getattr(config, k) for k in KINDS})

    def before(self, kind: str) -> datetime | None:
        window = self.windows[kind]
        return None if window is None else self.now - timedelta(seconds=window)


@dataclass(slots=True)
class PassReport:
    """What one pass removed, per kind (``recipients`` also counts the messages deleted with them)."""

    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys((*KINDS, "messages", "attempt_days", "event_days"), 0)
    )
    """``attempt_days`` / ``event_days``: day partitions dropped whole (their rows are not counted)."""
    skipped: list[str] = field(default_factory=list)
    """Kinds not purged, with why (e.g. the audit log's owner is not in this build)."""

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _audit_owner() -> ModuleType | None:
    """The audit log's owner module, or None when this build has none."""
    try:
        return importlib.import_module(AUDIT_OWNER)
    except ModuleNotFoundError as exc:
        if exc.name == AUDIT_OWNER:
            return None
        raise


class Retention:
    """Runs purge passes over a pool: :meth:`run` in the background, :meth:`purge` once, :meth:`show`."""

    def __init__(
        self, pool: asyncpg.Pool, config: RetentionConfig, stopping: asyncio.Event | None = None,
        export_destination: str | None = None,
    ) -> None:
        self.pool = pool
        self.config = config
        self.stopping = stopping or asyncio.Event()
        self.export_destination = export_destination
        """The exporter's destination when ``[export]`` is on: events it has not written are kept."""

    async def run(self) -> None:
        """Purge every ``interval`` until stopped; survives database outages and its own bugs."""
        while not self.stopping.is_set():
            try:
                report = await self.purge()
                if report.total:
                    log.info("retention_purged", **report.counts)
            except DatabaseUnavailable as exc:
                log.warning("retention_database_unavailable", error=str(exc))
            except Exception:  # the purge must never die silently
                log.exception("retention_failed")
            await self._sleep(self.config.interval)

    async def purge(self, now: datetime | None = None) -> PassReport:
        """One pass over every kind, each in batches until nothing is due (or the engine stops)."""
        policy = Policy.at(self.config, now)
        report = PassReport()
        bodies = policy.before("message_bodies")
        if bodies is not None:
            report.counts["message_bodies"] = await self._batches(lambda c: prune_bodies(c, bodies, self.config.batch_size))
        recipients = policy.before("recipients")
        if recipients is not None:
            async with acquire(self.pool) as conn:
                report.counts["attempt_days"] = len(await drop_attempt_days(conn, recipients))
            report.counts["recipients"], report.counts["messages"] = await self._recipient_batches(recipients)
        events = policy.before("events")
        if events is not None:
            dest = self.export_destination
            async with acquire(self.pool) as conn:
                report.counts["event_days"] = len(await drop_event_days(conn, events, dest))
            report.counts["events"] = await self._batches(lambda c: prune_events(c, events, self.config.batch_size, dest))
        audit = policy.before("audit")
        if audit is not None:
            owner = _audit_owner()
            prune = getattr(owner, "prune", None)
            if prune is None:
                report.skipped.append(f"audit: {AUDIT_OWNER}.prune is not available in this build")
            else:
                report.counts["audit"] = await self._audit_batches(prune, audit)
        return report

    async def _batches(self, one: Callable[[asyncpg.Connection], Awaitable[int]]) -> int:
        """Repeat ``one`` batch until a batch comes back short; a pause between batches."""
        total = 0
        while not self.stopping.is_set():
            async with acquire(self.pool) as conn:
                n = await one(conn)
            total += n
            if n < self.config.batch_size:
                break
            await self._sleep(self.config.pause)
        return total

    async def _recipient_batches(self, before: datetime) -> tuple[int, int]:
        recipients = messages = 0
        while not self.stopping.is_set():
            async with acquire(self.pool) as conn:
                pruned = await prune_recipients(conn, before, self.config.batch_size)
            recipients += pruned.recipients
            messages += pruned.messages
            if pruned.recipients < self.config.batch_size:
                break
            await self._sleep(self.config.pause)
        return recipients, messages

    async def _audit_batches(self, prune: Callable[..., Awaitable[Any]], before: datetime) -> int:
        """Batches through the owner: ``prune(conn, before, limit=...)`` until a batch comes back short
        (an owner without a ``limit`` parameter picks its own batch size: called until it finds nothing)."""
        sized = "limit" in inspect.signature(prune).parameters
        total = 0
        for _ in range(_MAX_AUDIT_CALLS):
            if self.stopping.is_set():
                break
            async with acquire(self.pool) as conn:
                n = await (prune(conn, before, limit=self.config.batch_size) if sized else prune(conn, before))
            if not isinstance(n, int) or n <= 0:
                break
            total += n
            if sized and n < self.config.batch_size:
                break
            await self._sleep(self.config.pause)
        return total

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)

    async def show(self, now: datetime | None = None) -> dict[str, Any]:
        """The policy, each table's size and row estimate, and how many rows of each kind are due now."""
        policy = Policy.at(self.config, now)
        async with acquire(self.pool) as conn:
            sizes = await conn.fetch(*q("retention_sizes", tables=list(TABLES)))
            due: dict[str, int | None] = await due_for_retention(
                conn, policy.before("message_bodies"), policy.before("recipients")
            )
            events = policy.before("events")
            due["events"] = None if events is None else await events_due(conn, events, self.export_destination)
            due["audit"] = await self._audit_due(conn, policy.before("audit"))
            parts = await partitions.partitions(conn)
        return {
            "now": policy.now.isoformat(),
            "enabled": self.config.enabled,
            "interval_seconds": self.config.interval,
            "batch_size": self.config.batch_size,
            "policy": [{"kind": k, "keep_seconds": policy.windows[k], "before": _iso(policy.before(k))} for k in KINDS],
            "tables": [
                {"table": r["name"], "bytes": r["bytes"], "estimated_rows": r["estimated_rows"]} for r in sizes
            ],
            "due": due,
            "partitions": [_partition_summary(t, [p for p in parts if p.parent == t]) for t in partitions.PARTITIONED],
        }

    async def _audit_due(self, conn: asyncpg.Connection, before: datetime | None) -> int | None:
        count = getattr(_audit_owner(), "due", None)
        if before is None or count is None:
            return None
        n = await count(conn, before)
        return int(n) if isinstance(n, int) else None


def _partition_summary(table: str, parts: list[partitions.Partition]) -> dict[str, Any]:
    """One table's day partitions: how many, which days, how big; and what fell into its default partition."""
    days = [p for p in parts if p.day is not None]
    default = next((p for p in parts if p.day is None), None)
    return {
        "table": table,
        "days": len(days),
        "oldest_day": days[0].day.isoformat() if days and days[0].day else None,
        "newest_day": days[-1].day.isoformat() if days and days[-1].day else None,
        "bytes": sum(p.bytes for p in parts),
        "default_bytes": default.bytes if default else None,
        "default_estimated_rows": default.estimated_rows if default else None,
    }


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat()
