"""Consent records: the only writer of ``consent`` and ``consent_history``.

Every change appends to the history (who, when, old -> new) and updates the current row in
one statement; the current state is what the history says last, by ``captured_at``: a change
older than the stored one does not override it, an identical one is a no-op, so imports are
idempotent. A change that makes an address fail a stream's rule stops that stream's queued
mail for it at once (the outbox moves the rows to ``suppressed``, each with its event), and
every applied change is a ``consent_changed`` event for webhooks and exports.

A batch goes in by binary COPY to ``consent_stage``, a temporary table each pooled connection
creates once and every commit empties (the only session state it keeps: no rows outlive a
transaction); one statement then judges the whole batch against ``consent`` by primary-key
probes and writes the new and changed lines, and Postgres builds their events from the history
rows. Per-row costs, measured: see the consent import row of the README's benchmark table.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from engine import metrics
from engine.consent.models import ConsentIn, ConsentRecord
from engine.consent.policy import ConsentPolicy
from engine.db.pool import acquire
from engine.db.queries import q
from engine.errors import ValidationFailed
from engine.events.store import record_consent_history
from engine.outbox import suppress_pending

OUTCOMES = ("new", "changed", "unchanged", "stale")


@dataclass
class Applied:
    """What a batch of changes came to."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    outcomes: list[str] = field(default_factory=list)
    """Per input change, in order: new, changed, unchanged or stale."""
    stopped: int = 0
    """Queued recipients stopped by the changes (revocations)."""


def check_purpose(policy: ConsentPolicy, purpose: str, field_name: str = "purpose") -> str:
    if purpose not in policy.all_purposes:
        raise ValidationFailed(f"unknown purpose {purpose!r}; declared: {', '.join(policy.all_purposes)}", field=field_name)
    return purpose


def _latest(changes: Sequence[ConsentRecord]) -> tuple[list[ConsentRecord], list[int]]:
    """One change per (address, purpose), the latest by captured_at (the later line on a tie).

    One statement cannot update a row twice; returns the kept changes and, per input, the
    index of the kept change that stands for it.
    """
    if len({(c.address, c.purpose) for c in changes}) == len(changes):
        return list(changes), list(range(len(changes)))  # the usual batch: every key once
    keep: dict[tuple[str, str], int] = {}
    for i, c in enumerate(changes):
        k = (c.address, c.purpose)
        j = keep.get(k)
        if j is None or c.captured_at >= changes[j].captured_at:
            keep[k] = i
    kept_idx = sorted(keep.values())
    pos = {i: n for n, i in enumerate(kept_idx)}
    return [changes[i] for i in kept_idx], [pos[keep[(c.address, c.purpose)]] for c in changes]


_STAGE_COLUMNS = (
    "idx", "address", "purpose", "status", "legal_basis", "source", "captured_at", "policy_version",
    "double_opt_in_at", "evidence", "effective_from", "effective_until", "contact_id", "legacy",
)


async def apply_changes(
    conn: asyncpg.Connection, changes: Sequence[ConsentIn | ConsentRecord], actor: str, policy: ConsentPolicy,
) -> Applied:
    """Record changes in the caller's transaction; stop queued mail they forbid; one event per applied change.

    The batch is COPYed into the session's staging table and judged there set-based (see the
    ``consent_apply_staged`` query); the events are made by Postgres from the history rows
    written, so the engine's work per change is building one tuple.
    """
    out = Applied()
    if not changes:
        return out
    records = [c.record() if isinstance(c, ConsentIn) else c for c in changes]
    purposes = policy.all_purposes
    for c in records:
        if c.purpose not in purposes:
            check_purpose(policy, c.purpose)
    actor = actor[:200]
    kept, stands_for = _latest(records)
    await conn.execute(*q("consent_stage_create"))
    await conn.copy_records_to_table("consent_stage", columns=_STAGE_COLUMNS, records=[
        (i, c.address, c.purpose, c.status, c.legal_basis, c.source, c.captured_at, c.policy_version,
         c.double_opt_in_at, None if c.evidence is None else orjson.dumps(c.evidence).decode(), c.effective_from,
         c.effective_until, c.contact_id, c.legacy)
        for i, c in enumerate(kept)
    ])
    row = await conn.fetchrow(*q("consent_apply_staged", actor=actor))
    assert row is not None  # an aggregate answers one row
    outcome: list[str] = row["outcomes"]
    counts = out.counts
    if len(kept) == len(records):  # no address and purpose twice in the batch: the outcomes as they are
        out.outcomes = outcome
        for o in outcome:
            counts[o] += 1
    else:
        for n, i in enumerate(stands_for):
            # A line superseded by a later line of the same batch counts as stale.
            o = outcome[i] if records[n] is kept[i] else "stale"
            out.outcomes.append(o)
            counts[o] += 1
    stop: list[tuple[str, str, str]] = []
    now = datetime.now(UTC)
    blocks: dict[tuple[str, str, bool], list[str]] = {}
    changed: dict[tuple[str, str], int] = {}
    for i, c in enumerate(kept):
        if outcome[i] not in ("new", "changed"):
            continue
        changed[c.purpose, c.status] = changed.get((c.purpose, c.status), 0) + 1
        if not _in_effect(c, now):
            continue  # a revocation from a later date stops nothing yet: the claim check stops its mail once it applies
        key = (c.purpose, c.status, c.legacy)
        streams = blocks.get(key)
        if streams is None:
            streams = blocks[key] = policy.blocks(*key)
        for stream in streams:
            stop.append((c.address, stream, f"consent:{c.purpose}"))
    if stop:
        out.stopped = len(await suppress_pending(conn, stop))
    await record_consent_history(conn, row["history_ids"])
    m = metrics.get()
    for (purpose, status), n in changed.items():
        metrics.inc(m.consent_changes, n, purpose=purpose, status=status)
    return out


def _in_effect(c: ConsentRecord, now: datetime) -> bool:
    """Whether a record applies now (its effective window, as the enqueue and claim checks read it)."""
    return (c.effective_from is None or c.effective_from <= now) and (c.effective_until is None or c.effective_until > now)


async def erase(conn: asyncpg.Connection, address: str) -> int:
    """Remove an address's consent and its history (erasure); returns the rows removed."""
    row = await conn.fetchrow(*q("consent_erase", address=address))
    return int(row["n"]) if row is not None else 0


class ConsentStore:
    def __init__(self, pool: asyncpg.Pool, policy: ConsentPolicy) -> None:
        self.pool = pool
        self.policy = policy

    async def record(self, changes: Sequence[ConsentIn | ConsentRecord], actor: str) -> Applied:
        async with acquire(self.pool) as conn, conn.transaction():
            return await apply_changes(conn, changes, actor, self.policy)

    async def current(self, address: str) -> builtins.list[dict[str, Any]]:
        async with acquire(self.pool) as conn:
            return [dict(r) for r in await conn.fetch(*q("consent_for_address", address=address))]

    async def history(self, address: str, limit: int = 200) -> builtins.list[dict[str, Any]]:
        async with acquire(self.pool) as conn:
            return [dict(r) for r in await conn.fetch(*q("consent_history_for_address", address=address, limit=limit))]

    async def page(
        self, after: tuple[str, str] | None, limit: int, purpose: str | None = None,
    ) -> builtins.list[dict[str, Any]]:
        """Current records in (address, purpose) order after ``after``: the export's keyset pages."""
        a, p = after if after is not None else ("", "")
        async with acquire(self.pool) as conn:
            rows = await conn.fetch(*q("consent_page", after_address=a, after_purpose=p, purpose=purpose, limit=limit))
        return [dict(r) for r in rows]
