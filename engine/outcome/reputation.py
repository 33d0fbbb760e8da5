"""Rolling reputation windows per (provider, source, sending domain).

Why counters and not a scan of ``attempts``/``events``: shaping and automation
ask "how is Gmail treating us over the last 24 h" often, and the answer must
not cost a scan of millions of rows. Writers add per-minute buckets in the
transactions they already run (the delivery outcome writer's flush, the
inbound listener's report transaction): :func:`record_counters` pre-sums a
batch in Python and upserts it in one statement, so the hot path pays no
round trip of its own. A window is a sum over at most ``seconds / 60`` buckets
per key, served by the primary key index.

Outcomes counted: ``delivered``, ``deferred`` (by category), ``bounced``
(permanent failures, by category: hard bounces are the ``unknown_user`` /
``bad_domain`` ones), ``complained``. ``provider`` is the shaping layer's
provider name when the caller knows it, else the recipient's domain.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from engine.db.pool import acquire
from engine.db.queries import q
from engine.feedback.classify import HARD_CATEGORIES

OUTCOMES = ("delivered", "deferred", "bounced", "complained")


@dataclass(frozen=True, slots=True)
class CounterRow:
    """One thing that happened (``n`` times) to mail for ``provider``."""

    provider: str
    outcome: str
    category: str = ""
    source: str = ""
    sending_domain: str = ""
    n: int = 1
    at: datetime | None = None
    """None: the database's now() (the usual case)."""


def _minute(at: datetime | None) -> datetime | None:
    if at is None:
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.replace(second=0, microsecond=0)


async def record_counters(conn: asyncpg.Connection, rows: Iterable[CounterRow]) -> int:
    """Add a batch of counters in one statement (inside the caller's transaction). Returns keys written."""
    summed: Counter[tuple[Any, ...]] = Counter()
    for r in rows:
        if r.outcome not in OUTCOMES:
            raise ValueError(f"reputation outcome {r.outcome!r} is not one of {OUTCOMES}")
        if r.n <= 0:
            continue
        summed[(r.provider or "", _minute(r.at), r.source or "", (r.sending_domain or "").lower(), r.outcome, r.category or "")] += r.n
    if not summed:
        return 0
    # Sorted so concurrent writers lock the same keys in the same order (no deadlocks).
    keys = sorted(summed, key=lambda k: (k[0], k[1] or datetime.min.replace(tzinfo=UTC), *k[2:]))
    await conn.execute(
        *q(
            "reputation_add",
            ats=[k[1] for k in keys],
            providers=[k[0] for k in keys],
            sources=[k[2] for k in keys],
            sending_domains=[k[3] for k in keys],
            outcomes=[k[4] for k in keys],
            categories=[k[5] for k in keys],
            ns=[summed[k] for k in keys],
        )
    )
    return len(keys)


@dataclass
class Counts:
    """Totals over a window, with the rates shaping and automation act on."""

    delivered: int = 0
    deferred: dict[str, int] = field(default_factory=dict)
    bounced: dict[str, int] = field(default_factory=dict)
    complaints: int = 0

    def add(self, outcome: str, category: str, n: int) -> None:
        if outcome == "delivered":
            self.delivered += n
        elif outcome == "deferred":
            self.deferred[category] = self.deferred.get(category, 0) + n
        elif outcome == "bounced":
            self.bounced[category] = self.bounced.get(category, 0) + n
        elif outcome == "complained":
            self.complaints += n

    @property
    def deferred_total(self) -> int:
        return sum(self.deferred.values())

    @property
    def bounced_total(self) -> int:
        return sum(self.bounced.values())

    @property
    def hard_bounces(self) -> int:
        return sum(n for c, n in self.bounced.items() if c in HARD_CATEGORIES)

    @property
    def attempted(self) -> int:
        """Every SMTP outcome counted (a deferral is an attempt too)."""
        return self.delivered + self.deferred_total + self.bounced_total

    @property
    def delivered_ratio(self) -> float:
        """delivered / attempted (1.0 with no attempts: no evidence of trouble)."""
        return self.delivered / self.attempted if self.attempted else 1.0

    @property
    def hard_bounce_rate(self) -> float:
        """hard bounces / (delivered + bounced): final outcomes only."""
        final = self.delivered + self.bounced_total
        return self.hard_bounces / final if final else 0.0

    @property
    def complaint_rate(self) -> float:
        """complaints / delivered (the way mailbox providers count it)."""
        return self.complaints / self.delivered if self.delivered else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "delivered": self.delivered,
            "deferred": dict(sorted(self.deferred.items())),
            "bounced": dict(sorted(self.bounced.items())),
            "complaints": self.complaints,
            "attempted": self.attempted,
            "hard_bounces": self.hard_bounces,
            "delivered_ratio": round(self.delivered_ratio, 6),
            "hard_bounce_rate": round(self.hard_bounce_rate, 6),
            "complaint_rate": round(self.complaint_rate, 6),
        }


class Reputation:
    """Read side: ``await Reputation(pool).window("gmail", seconds=86400)``."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def window(
        self, provider: str, source: str | None = None, domain: str | None = None, seconds: float = 86400.0
    ) -> Counts:
        """Totals for ``provider`` (optionally one egress source and/or sending domain) over ``seconds``."""
        async with acquire(self.pool) as conn:
            rows = await conn.fetch(
                *q(
                    "reputation_window",
                    provider=provider,
                    source=source,
                    sending_domain=None if domain is None else domain.lower(),
                    seconds=float(seconds),
                )
            )
        counts = Counts()
        for r in rows:
            counts.add(r["outcome"], r["category"], r["n"])
        return counts

    async def summary(self, provider: str | None = None, seconds: float = 86400.0) -> dict[tuple[str, str, str], Counts]:
        """(provider, source, sending domain) -> Counts, for everything seen in the window."""
        async with acquire(self.pool) as conn:
            rows = await conn.fetch(*q("reputation_summary", provider=provider, seconds=float(seconds)))
        out: dict[tuple[str, str, str], Counts] = {}
        for r in rows:
            out.setdefault((r["provider"], r["source"], r["sending_domain"]), Counts()).add(r["outcome"], r["category"], r["n"])
        return out

    async def prune(self, keep_seconds: float = 8 * 86400.0) -> int:
        """Drop buckets older than ``keep_seconds`` (housekeeping); returns rows deleted."""
        async with acquire(self.pool) as conn:
            status = await conn.execute(*q("reputation_prune", keep_seconds=float(keep_seconds)))
        return int(status.split()[-1])
